"""The gate that holds threads started while the agent still has its start-up capabilities
(receiver/kernel/privileges.py ``StartupThreads``); the agent under it is checked in
tests/test_least_privilege.py."""

from __future__ import annotations

import threading

from receiver.kernel.privileges import StartupThreads

from .harness import wait_until


def test_threads_started_while_held_run_only_after_the_release() -> None:
    """The gate alone (no capability needed): a thread the holding thread starts waits; one
    started within ``privileged()`` or by another thread runs at once; ``release`` lets the
    held one run, and threads started after it are not held."""
    gate = StartupThreads()
    ran: list[str] = []

    def note(name: str) -> threading.Thread:
        return threading.Thread(target=ran.append, args=(name,), name=name)

    original = threading.Thread.start
    gate.hold()
    try:
        held = note("held")
        held.start()
        with gate.privileged():
            loader = note("loader")
            loader.start()
            loader.join(5)
            other = threading.Thread(target=lambda: note("by-another").start())
            other.start()
            other.join(5)
        wait_until(lambda: "by-another" in ran, 5, 0.01, "the thread another thread started")
        held.join(0.3)
        assert held.is_alive() and "held" not in ran, ran
    finally:
        failed = gate.release(None)
    assert failed == []
    held.join(5)
    assert ran[-1] == "held" and set(ran) == {"held", "loader", "by-another"}, ran
    assert threading.Thread.start is original
    after = note("after")
    after.start()
    after.join(5)
    assert ran[-1] == "after"
    assert gate.release(set()) == []   # only the first release counts
