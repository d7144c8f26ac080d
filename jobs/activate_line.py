"""The demo long-running tool: activating a phone line takes a while, in a few steps."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field, field_validator

from jobs.context import JobContext
from jobs.registry import LongRunningTool, RetryPolicy

_PHONE = re.compile(r"^\+?[0-9][0-9 ().-]{2,18}[0-9]$")
STEPS = ("Reserving the number", "Provisioning the SIM", "Registering on the network", "Running a test call")


class ActivateLineArgs(BaseModel):
    phone_number: str = Field(description="The phone number to activate, e.g. 555-0100 or +1 425 555 0100")

    @field_validator("phone_number")
    @classmethod
    def _valid_number(cls, value: str) -> str:
        value = value.strip()
        digits = re.sub(r"\D", "", value)
        if not _PHONE.match(value) or not 4 <= len(digits) <= 15:
            raise ValueError(
                f"{value!r} is not a phone number: use 4 to 15 digits, optionally with +, spaces, dashes or dots"
            )
        return value


def make_activate_line_tool(seconds: float, activations: dict[str, str] | None = None) -> LongRunningTool:
    """``activations`` stands in for the carrier's system: job id -> number, to show idempotency."""
    done = activations if activations is not None else {}

    async def run(ctx: JobContext, args: ActivateLineArgs) -> dict[str, Any]:
        if ctx.idempotency_key in done:  # a re-run after a crash: the line is already active
            return _result(args.phone_number, ctx.job_id)
        for index, step in enumerate(STEPS):
            await ctx.report_progress(index / len(STEPS), f"{step}…")
            await ctx.sleep(seconds / len(STEPS))
        done[ctx.idempotency_key] = args.phone_number
        await ctx.report_progress(1.0, "Line active")
        return _result(args.phone_number, ctx.job_id)

    return LongRunningTool(
        name="activate_new_line",
        description=(
            "Activate a new phone line. Takes a while: it runs as a background job and the user is told "
            "when it finishes. Returns the job id at once."
        ),
        args_model=ActivateLineArgs,
        run=run,
        timeout=max(60.0, seconds * 3),
        retry=RetryPolicy(max_attempts=3, initial_delay=2.0),
        scheduled_message=lambda args, job_id: (
            f"I've started activating line {args.phone_number} (job `{job_id}`). "
            f"It takes about {_duration(seconds)}; I'll message you here when it's done."
        ),
    )


def _result(number: str, job_id: str) -> dict[str, Any]:
    return {"phone_number": number, "status": "active", "job_id": job_id,
            "message": f"✅ Line {number} is active (job `{job_id}`)."}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:g} seconds"
    return f"{seconds / 60:.0f} minutes"
