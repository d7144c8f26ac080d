"""LocalCoordinator: one process is web and worker at once, so every call stays in-process."""

from __future__ import annotations

from cluster import LocalCoordinator
from runtime import metrics


async def test_it_is_the_active_worker_once_it_leads_and_until_it_closes() -> None:
    coordinator = LocalCoordinator()
    await coordinator.open()
    assert not coordinator.active
    woken: list[str] = []
    cancelled: list[tuple[str, str]] = []

    async def on_cancel(key: str, job_id: str) -> None:
        cancelled.append((key, job_id))

    assert await coordinator.lead(woken.append, on_cancel, wait=False) is True
    assert coordinator.active and metrics.ACTIVE_WORKER._value.get() == 1
    coordinator.wake("k1")
    await coordinator.cancel("k1", "j1")  # in-process: done when it returns
    assert woken == ["k1"] and cancelled == [("k1", "j1")]
    assert await coordinator.check() is None  # nothing shared to check

    await coordinator.close()
    assert not coordinator.active and metrics.ACTIVE_WORKER._value.get() == 0
    coordinator.wake("k2")
    await coordinator.cancel("k2", "j2")
    assert woken == ["k1"] and cancelled == [("k1", "j1")]  # nobody leads: the sweep finds the work


async def test_wake_ups_before_it_leads_go_nowhere() -> None:
    """Start-up recovery finds that work in the store, so nothing needs to be queued."""
    coordinator = LocalCoordinator()
    coordinator.wake("early")
    await coordinator.cancel("early", "j")
    woken: list[str] = []

    async def on_cancel(key: str, job_id: str) -> None:
        raise AssertionError("no cancel was asked for after lead()")

    await coordinator.lead(woken.append, on_cancel)
    assert woken == []


async def test_one_process_owns_every_conversation_without_a_fence() -> None:
    """Issue 18: one process holds everything; nothing is fenced; lead() tells the worker so at once."""
    coordinator = LocalCoordinator()
    changes: list[tuple[set[int], set[int]]] = []

    async def on_change(gained: set[int], lost: set[int]) -> None:
        changes.append((gained, lost))

    async def on_cancel(key: str, job_id: str) -> None:
        pass

    await coordinator.lead(lambda key: None, on_cancel, on_change=on_change)
    assert changes == [({0}, set())]
    assert coordinator.ownership.owns("msteams:any") and coordinator.ownership.fence("msteams:any") is None
