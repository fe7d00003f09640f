"""One daemon thread that applies queued work items in order, off the event loop and off the
drain: the unwinder's table loads and the CPython code-object reads both run on one each."""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["QueueWorker"]

log = logging.getLogger(__name__)


class QueueWorker:
    """``put`` never blocks (a full queue drops the item and counts ``queue_full`` in
    ``stats``); ``handle(item)`` runs on the thread, and what it raises is counted as ``errors``
    and logged, never ending the thread; ``wait_idle`` is for tests and tools."""

    def __init__(self, name: str, handle: Callable[[Any], None], size: int, stats: Counter[str]) -> None:
        self._name = name
        self._handle = handle
        self._queue: queue.Queue[Any] = queue.Queue(size)
        self._stats = stats
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the thread after the items already queued."""
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
            self._thread = None

    def put(self, item: Any) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._stats["queue_full"] += 1

    def wait_idle(self, timeout: float) -> bool:
        """Whether everything queued so far was handled within ``timeout`` seconds."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._handle(item)
            except Exception:   # noqa: BLE001 -- one item's trouble must not stop the worker
                self._stats["errors"] += 1
                log.exception("%s: %r", self._name, item)
