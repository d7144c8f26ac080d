"""A job's result, error and progress text are clipped before they are stored (issue 13, finding 11):
the job record and the ``job:<id>`` inbox event both hold at most MAX_TOOL_RESULT_CHARS of output."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from jobs.context import JobContext
from jobs.registry import JobRegistry, LongRunningTool, PermanentJobError, RetryPolicy
from jobs.runner import JobRunner, clip_result
from storage.abc import JobRecord
from storage.memory import MemoryStore
from tests.storage.jobs import add_job

KEY = "emulator:conv-1"
MEGABYTE = 1024 * 1024


class NoArgs(BaseModel):
    pass


async def big_result(ctx: JobContext, args: NoArgs) -> dict[str, Any]:
    await ctx.report_progress(0.5, "p" * 100_000)
    return {"status": "done", "message": "r" * MEGABYTE, "server": "reports"}


async def big_error(ctx: JobContext, args: NoArgs) -> dict[str, Any]:
    raise PermanentJobError("e" * MEGABYTE)


def runner(store: MemoryStore) -> JobRunner:
    once = RetryPolicy(max_attempts=1)
    registry = JobRegistry([LongRunningTool("big_result", "1 MB result", NoArgs, big_result, retry=once),
                            LongRunningTool("big_error", "1 MB error", NoArgs, big_error, retry=once)])
    return JobRunner(store, registry, lambda key: None, max_result_chars=8000)


async def run_job(tool: str) -> tuple[JobRecord, Any, MemoryStore]:
    store = MemoryStore()
    job = JobRecord(id=f"job-{tool}", conversation_key=KEY, tool=tool, arguments={})
    await add_job(store, job)
    await runner(store).run(KEY, job.id)
    event = await store.get_event(KEY, f"job:{job.id}")
    return await store.get_job(KEY, job.id), event, store


async def test_a_1_mb_result_is_clipped_in_the_record_and_the_inbox_event() -> None:
    job, event, _ = await run_job("big_result")
    assert job.status == "succeeded"
    assert job.result["status"] == "done" and job.result["clipped"] is True
    assert job.result["message"].endswith(f"[clipped: 8000 of {MEGABYTE} characters shown]")
    assert len(json.dumps(job.to_json())) < 10_000
    assert len(event.payload["content"]) < 10_000 and "[clipped: 8000 of" in event.payload["content"]
    assert json.loads(event.payload["content"]) == job.result


async def test_a_1_mb_error_is_clipped_in_the_record_and_the_inbox_event() -> None:
    job, event, _ = await run_job("big_error")
    assert job.status == "failed" and len(job.error or "") < 8100 and "[clipped: 8000 of" in (job.error or "")
    assert event.payload["content"] == job.error


def test_a_result_that_fits_is_kept_as_it_is() -> None:
    result = {"message": "ok", "status": "active"}
    assert clip_result(result, 8000) is result
