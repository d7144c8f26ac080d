"""Adaptive Cards: the live job card, the jobs list, the welcome card and the reset question (plain JSON).

Cards use schema 1.5 (Teams desktop, web and mobile). The job card's Cancel button is an
``Action.Execute`` (answered inline with the refreshed card) whose ``fallback`` is an
``Action.Submit`` carrying the same data, for clients without Universal Actions. Buttons that
answer for the user ("Try: ...", Help, Yes / No) are :func:`say_action`: never ``imBack``,
which the Agents Playground does not support.

A job's arguments, result, error and progress text come from users, models and tools: on a card
they are escaped (:func:`untrusted.escape_markdown`: TextBlock and FactSet values render
Markdown) and clipped, so a card shows them literally and stays within Teams' message size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from dialogs.buttons import adaptive_card, say_action
from jobs.access import shows_arguments, started_by_label
from jobs.approval import EXPIRED, REJECTED, decision, decision_line
from runtime.protocol import Requester
from runtime.untrusted import clip, escape_markdown, inline_code
from storage.abc import JSON, JobRecord

CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
CANCEL_VERB = "cancelJob"

STATUS_LABELS = {
    "queued": ("⏳", "Queued", "default"),
    "running": ("🔄", "Running", "accent"),
    "succeeded": ("✅", "Succeeded", "good"),
    "failed": ("❌", "Failed", "attention"),
    "cancelled": ("⛔", "Cancelled", "warning"),
    "awaiting_approval": ("✋", "Awaiting approval", "warning"),  # issue 16
    "rejected": ("🚫", "Rejected", "attention"),
    "expired": ("⌛", "Expired", "warning"),
}


def card_activity(card: JSON, *, summary: str) -> JSON:
    """A message activity carrying one card; ``summary`` is what notifications and old clients show."""
    return {"type": "message", "summary": summary,
            "attachments": [{"contentType": CARD_CONTENT_TYPE, "content": card}]}


_card = adaptive_card


def tool_title(tool: str) -> str:
    return tool.replace("_", " ").capitalize()


#: Longest untrusted text on a card: a fact's value (an argument, a step), and a result or error.
MAX_FACT_CHARS = 300
MAX_CARD_TEXT_CHARS = 4000


def shown(text: object, limit: int = MAX_FACT_CHARS) -> str:
    """Untrusted text for a card: clipped, then escaped (shown literally, never as a link)."""
    return escape_markdown(clip(str(text), limit))


def _clock(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def progress_bar(fraction: float | None, width: int = 10) -> str:
    if fraction is None:
        return "-"
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "░" * (width - filled) + f" {fraction:.0%}"


def job_card(job: JobRecord, now: float | None = None, *, notice: str | None = None) -> JSON:
    """The live card for one job: what, who started it, state, progress, times, and Cancel while
    it can be; ``notice`` (why a cancel was refused) is shown below."""
    now = now or time.time()
    # Rejected or expired, and the runner has not ended it yet (a moment): show the decision, no Cancel.
    declined = job.status == "queued" and decision(job) in (REJECTED, EXPIRED)
    icon, label, color = STATUS_LABELS.get((declined and decision(job)) or job.status, ("•", job.status, "default"))
    if job.cancel_requested and not job.finished:
        icon, label, color = "⛔", "Cancelling…", "warning"
    facts = [{"title": "Job", "value": shown(job.id)}]
    if who := started_by_label(job):
        facts.append({"title": "Started by", "value": shown(who, 200)})
    facts += [{"title": shown(name.replace("_", " ").capitalize(), 60), "value": shown(value)}
              for name, value in list(job.arguments.items())[:10]]
    facts.append({"title": "Status", "value": f"{icon} {label}"})
    if (decided := decision_line(job)) is not None:  # a job that awaited approval: who decided, when
        facts.append({"title": "Approval", "value": shown(decided)})
    if job.status == "running" or (job.progress is not None and not job.finished):
        facts.append({"title": "Progress", "value": progress_bar(job.progress)})
    if job.progress_text and not job.finished:
        facts.append({"title": "Step", "value": shown(job.progress_text)})
    facts.append({"title": "Started", "value": _clock(job.started_at or job.created_at)})
    if job.finished:
        facts.append({"title": "Finished", "value": _clock(job.finished_at)})
    else:
        facts.append({"title": "Elapsed", "value": _duration(now - (job.started_at or job.created_at))})
    if job.max_attempts > 1 and job.attempt > 1:
        facts.append({"title": "Attempt", "value": f"{job.attempt} of {job.max_attempts}"})
    if job.status == "queued" and job.next_retry_at:
        facts.append({"title": "Retry in", "value": _duration(job.next_retry_at - now)})
    body: list[JSON] = [
        {"type": "TextBlock", "text": shown(tool_title(job.tool)), "weight": "Bolder", "size": "Medium", "wrap": True},
        {"type": "TextBlock", "text": f"{icon} {label}", "color": color, "weight": "Bolder", "spacing": "None"},
        {"type": "FactSet", "facts": facts},
    ]
    if job.status == "failed" and job.error:
        body.append({"type": "TextBlock", "text": shown(job.error, MAX_CARD_TEXT_CHARS), "wrap": True,
                     "color": "attention", "size": "Small"})
    if job.status == "succeeded" and isinstance(job.result, dict) and job.result.get("message"):
        body.append({"type": "TextBlock", "text": shown(job.result["message"], MAX_CARD_TEXT_CHARS), "wrap": True})
    if notice:
        body.append({"type": "TextBlock", "text": notice, "wrap": True, "color": "attention", "weight": "Bolder"})
    actions = None if job.finished or job.cancel_requested or declined else [cancel_action(job)]
    return _card(body, actions)


def notice_card(text: str) -> JSON:
    return _card([{"type": "TextBlock", "text": text, "wrap": True}])


def cancel_action(job: JobRecord) -> JSON:
    data = {"action": CANCEL_VERB, "jobId": job.id}
    return {
        "type": "Action.Execute", "title": "Cancel", "verb": CANCEL_VERB, "data": data, "style": "destructive",
        "fallback": {"type": "Action.Submit", "title": "Cancel", "data": data},
    }


def job_card_activity(job: JobRecord) -> JSON:
    return card_activity(job_card(job), summary=f"{clip(tool_title(job.tool), 100)}: {job.status}")


def jobs_list_card(jobs: list[JobRecord], now: float | None = None, *, viewer: Requester | None = None) -> JSON:
    """The jobs of a conversation, newest 20. In a group chat or channel, ``viewer`` sees the
    arguments of their own jobs only; every job shows who started it."""
    if not jobs:
        return _card([{"type": "TextBlock", "text": "No background jobs in this conversation yet.", "wrap": True}])
    rows: list[JSON] = [{"type": "TextBlock", "text": f"Background jobs ({len(jobs)})", "weight": "Bolder",
                         "size": "Medium"}]
    for job in jobs[-20:]:
        icon, label, _ = STATUS_LABELS.get(job.status, ("•", job.status, "default"))
        detail = (shown(", ".join(str(v) for v in job.arguments.values()), 200)
                  if shows_arguments(job, viewer) else "")
        progress = f" · {progress_bar(job.progress)}" if job.status == "running" else ""
        by = f" · started by {shown(who, 200)}" if (who := started_by_label(job)) else ""
        rows.append({"type": "ColumnSet", "separator": True, "columns": [
            {"type": "Column", "width": "auto", "items": [{"type": "TextBlock", "text": icon}]},
            {"type": "Column", "width": "stretch", "items": [
                {"type": "TextBlock", "text": f"**{shown(tool_title(job.tool))}** {detail}", "wrap": True},
                {"type": "TextBlock", "text": f"{inline_code(job.id)} · {label}{progress}{by}", "isSubtle": True,
                 "spacing": "None", "size": "Small", "wrap": True},
            ]},
        ]})
    if len(jobs) > 20:
        rows.append({"type": "TextBlock", "text": f"…and {len(jobs) - 20} older jobs", "isSubtle": True})
    return _card(rows)


def welcome_card(offline: bool, *, examples: Sequence[str] = ()) -> JSON:
    """The card a new conversation opens with: one "Try:" button per example prompt, and Help."""
    lines = [
        "I remember this conversation, even if I restart.",
        "Long tasks run in the background and I post the result here when they finish.",
    ]
    if offline:
        lines.append("I'm running on the built-in **offline model**; say `help` for the phrases I understand.")
    body: list[JSON] = [
        {"type": "TextBlock", "text": "👋 Hi! I'm your durable agent", "weight": "Bolder", "size": "Large",
         "wrap": True},
        *({"type": "TextBlock", "text": line, "wrap": True} for line in lines),
    ]
    actions = [say_action(f"Try: {clip(example, 60)}", example) for example in examples[:4]]
    actions.append(say_action("Help", "help"))
    return _card(body, actions)


def welcome_activity(offline: bool, *, examples: Sequence[str] = ()) -> JSON:
    # Card only: Teams and the Playground would show a text beside it as a separate message.
    return card_activity(welcome_card(offline, examples=examples), summary="👋 Hi! I'm your durable agent")


def parse_cancel(value: Any) -> str | None:
    """The job id from a Cancel click (Action.Execute data or Action.Submit value), else None."""
    if isinstance(value, dict) and value.get("action") == CANCEL_VERB and isinstance(value.get("jobId"), str):
        return str(value["jobId"])
    return None
