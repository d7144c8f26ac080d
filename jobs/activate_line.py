"""The demo long-running tool: activating a phone line takes a while, in a few steps.

Declared with ``@tool`` like any tool (jobs/registry.py); the default ``TOOL_MODULES`` names this
module. ``ACTIVATE_LINE_SECONDS`` (default 20) is how long an activation takes.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, Field, field_validator

from jobs.context import JobContext
from jobs.registry import LongRunningTool, RetryPolicy, tool, tool_setting

_PHONE = re.compile(r"^\+?[0-9][0-9 ().-]{2,18}[0-9]$")
STEPS = ("Reserving the number", "Provisioning the SIM", "Registering on the network", "Running a test call")


def activation_seconds() -> float:
    return tool_setting("ACTIVATE_LINE_SECONDS", 20.0)


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


#: Stands in for the carrier's system: job id -> number, to show idempotency across re-runs.
ACTIVATIONS: dict[str, str] = {}


@tool(
    long_running=True,
    timeout=max(60.0, activation_seconds() * 3),  # read at start-up: a bad value stops it there
    retry=RetryPolicy(max_attempts=3, initial_delay=2.0),
    example="activate line 555-0100",
    offline_phrase=re.compile(
        r"\bactivate\b(?:\s+(?:a|the|new|my|phone))*\s+line\b\s*(?:for\s+|number\s+)?(?P<phone_number>.*)$", re.I),
    scheduled_message=lambda args, job_id: _scheduled(args, job_id, activation_seconds()),
)
async def activate_new_line(ctx: JobContext, args: ActivateLineArgs) -> dict[str, Any]:
    """Activate a new phone line. Takes a while; the user is told when it finishes."""
    return await _activate(ctx, args, activation_seconds(), ACTIVATIONS)


def make_activate_line_tool(seconds: float, activations: dict[str, str] | None = None) -> LongRunningTool:
    """The same tool with a fixed duration, for tests and benchmarks (``activations``: the carrier's record)."""
    done = activations if activations is not None else {}

    async def run(ctx: JobContext, args: ActivateLineArgs) -> dict[str, Any]:
        return await _activate(ctx, args, seconds, done)

    return replace(activate_new_line.job, run=run, timeout=max(60.0, seconds * 3),
                   scheduled_message=lambda args, job_id: _scheduled(args, job_id, seconds))


async def _activate(ctx: JobContext, args: ActivateLineArgs, seconds: float, done: dict[str, str]) -> dict[str, Any]:
    if ctx.idempotency_key in done:  # a re-run after a crash: the line is already active
        return _result(args.phone_number, ctx.job_id)
    for index, step in enumerate(STEPS):
        await ctx.report_progress(index / len(STEPS), f"{step}…")
        await ctx.sleep(seconds / len(STEPS))
    done[ctx.idempotency_key] = args.phone_number
    await ctx.report_progress(1.0, "Line active")
    return _result(args.phone_number, ctx.job_id)


def _scheduled(args: ActivateLineArgs, job_id: str, seconds: float) -> str:
    return (f"I've started activating line {args.phone_number} (job `{job_id}`). "
            f"It takes about {_duration(seconds)}; I'll message you here when it's done.")


def _result(number: str, job_id: str) -> dict[str, Any]:
    return {"phone_number": number, "status": "active", "job_id": job_id,
            "message": f"✅ Line {number} is active (job `{job_id}`)."}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:g} seconds"
    return f"{seconds / 60:.0f} minutes"
