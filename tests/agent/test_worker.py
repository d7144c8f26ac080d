"""agent/worker.py: wake-ups that arrive while the worker starts wait until its services are up."""

from __future__ import annotations

from agent.worker import Wakeups


def test_wakeups_are_held_until_released_then_delivered_once_each() -> None:
    wakeups, delivered = Wakeups(), list[str]()
    wakeups.wake("a")
    wakeups.wake("b")
    wakeups.wake("a")  # one drain per conversation is enough
    assert delivered == []
    wakeups.release(delivered.append)
    assert sorted(delivered) == ["a", "b"]
    wakeups.wake("c")  # from now on, straight through
    assert delivered[-1] == "c" and len(delivered) == 3
