"""bot/job_cards.py: the completion waits for the final update of a card that showed progress."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from bot.job_cards import JobCardUpdater
from storage.abc import JobRecord


class FakeStore:
    def __init__(self, job: JobRecord) -> None:
        self.job = job

    async def patch_job(self, key: str, job_id: str, changes: dict[str, Any]) -> JobRecord:
        self.job = dataclasses.replace(self.job, **changes)
        return self.job

    async def get_job(self, key: str, job_id: str) -> JobRecord:
        return self.job

    async def get_reference(self, key: str) -> dict[str, Any]:
        return {"conversation": {"id": key}}


class FakeSender:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def update(self, reference: dict[str, Any], activity_id: str, activity: dict[str, Any]) -> None:
        self.log.append(f"update {activity['summary'].split(': ')[-1]}")


async def test_the_wake_waits_for_the_final_update_of_a_card_that_showed_progress() -> None:
    log: list[str] = []
    job = JobRecord(id="0d73272971a7", conversation_key="emulator:c1", tool="activate_new_line", arguments={})
    store = FakeStore(job)
    updater = JobCardUpdater(store, FakeSender(log), min_interval=0.3)  # type: ignore[arg-type]
    wake = updater.after_final_card(lambda key: log.append(f"wake {key}"))
    await updater.card_posted("emulator:c1", job.id, "card-1")
    await asyncio.sleep(0.35)
    await updater.job_changed(await store.patch_job("", job.id, {"status": "running", "progress": 0.5}))
    assert log == ["update running"]

    finished = await store.patch_job("", job.id, {"status": "succeeded", "progress": 1.0, "finished_at": 1.0})
    wake("emulator:c1")  # the runner announces first, then reports the final state
    assert log == ["update running"], "woken before the card's final update"
    await updater.job_changed(finished)  # waits out the interval, then updates, then wakes
    assert log == ["update running", "update succeeded", "wake emulator:c1"]
    wake("emulator:c1")  # no live card any more: at once
    assert log[-1] == "wake emulator:c1" and len(log) == 4
    await updater.close()


async def test_a_card_that_never_showed_progress_does_not_hold_the_wake() -> None:
    log: list[str] = []
    job = JobRecord(id="0d73272971a7", conversation_key="emulator:c1", tool="activate_new_line", arguments={})
    updater = JobCardUpdater(FakeStore(job), FakeSender(log), min_interval=0.3)  # type: ignore[arg-type]
    wake = updater.after_final_card(lambda key: log.append(f"wake {key}"))
    await updater.card_posted("emulator:c1", job.id, "card-1")
    wake("emulator:c1")
    assert log == ["wake emulator:c1"]
    await updater.close()
