"""The optional on-disk queue (as the Collector's persistent queue and Fluent Bit's filesystem
buffering): batches go to files before they are sent, and leave only once the Collector has
accepted them or their loss is counted. A Collector outage longer than the memory queue, or an
agent restart in the middle of one, then loses nothing.

One directory per signal; one file per request, named ``<sequence>-<items>.pb``, holding the
request's protobuf encoding (the transport encodes it for the wire when it is sent), written to a
temporary name and renamed, so a crash leaves either a whole file or none. Bounded in bytes per
signal: a batch that does not fit is dropped and counted (``disk_full``).
"""

from __future__ import annotations

import os
import re
from collections import deque
from pathlib import Path

__all__ = ["DiskQueue"]

_NAME = re.compile(r"(\d{12})-(\d+)\.pb")


class DiskQueue:
    """Oldest first; ``put`` and ``remove`` are small synchronous file operations."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self._files: deque[tuple[Path, int, int]] = deque()   # path, bytes, items
        self.bytes = 0
        self.items = 0
        self._next = 0

    def open(self) -> int:
        """Creates the directory (owner only) and takes up what a previous run left; returns
        the number of items found."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.directory.stat().st_mode & 0o077:   # made beforehand, wider: mkdir left it so
            self.directory.chmod(0o700)
        found = []
        for p in self.directory.iterdir():
            m = _NAME.fullmatch(p.name)
            if m is None:
                if p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)   # a write cut short: never acknowledged
                continue
            found.append((int(m.group(1)), p, p.stat().st_size, int(m.group(2))))
        for seq, p, size, items in sorted(found):
            self._files.append((p, size, items))
            self.bytes += size
            self.items += items
            self._next = seq + 1
        return self.items

    def put(self, data: bytes, items: int) -> bool:
        """Writes one request; False (nothing written) when it would pass ``max_bytes``."""
        if self.bytes + len(data) > self.max_bytes:
            return False
        path = self.directory / f"{self._next:012d}-{items}.pb"
        self._next += 1
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._files.append((path, len(data), items))
        self.bytes += len(data)
        self.items += items
        return True

    def peek(self) -> tuple[Path, int] | None:
        """The oldest request's file and item count."""
        if not self._files:
            return None
        path, _, items = self._files[0]
        return path, items

    def remove_oldest(self) -> None:
        path, size, items = self._files.popleft()
        path.unlink(missing_ok=True)
        self.bytes -= size
        self.items -= items
