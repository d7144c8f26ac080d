"""The approval card (issue 16): what a job awaiting approval will do, with Approve and Reject.

Posted instead of the live job card, under the same ``card:<job id>`` outbox id, so the card
updater (bot/job_cards.py) replaces it in place once the job is decided: the usual job card then
shows the decision (who, when) and the job's progress. :func:`card_for` is that choice.

The buttons are ``Action.Execute`` (Universal Actions: Teams answers an ``adaptiveCard/action``
invoke with the refreshed card for the clicker) with an ``Action.Submit`` fallback carrying the
same data, for clients without Universal Actions (a ``message`` with ``value``). The tool's
arguments and the requester's name are untrusted: clipped and escaped (:func:`bot.cards.shown`).
"""

from __future__ import annotations

from typing import Any

from bot.cards import card_activity, job_card, shown, tool_title
from dialogs.buttons import adaptive_card
from jobs.access import started_by_label
from jobs.approval import AWAITING, expires_at, when
from storage.abc import JSON, JobRecord

APPROVE_VERB, REJECT_VERB = "approveJob", "rejectJob"


def _button(title: str, verb: str, job: JobRecord, style: str) -> JSON:
    data = {"action": verb, "jobId": job.id}
    return {"type": "Action.Execute", "title": title, "verb": verb, "data": data, "style": style,
            "fallback": {"type": "Action.Submit", "title": title, "data": data}}


def approval_card(job: JobRecord, *, notice: str | None = None) -> JSON:
    """Plain words for what will run, who asked and when, until when; ``notice`` (a refusal) below."""
    who = started_by_label(job) or "Someone"
    facts = [{"title": "Job", "value": shown(job.id)}]
    facts += [{"title": shown(name.replace("_", " ").capitalize(), 60), "value": shown(value)}
              for name, value in list(job.arguments.items())[:10]]
    facts += [{"title": "Asked by", "value": shown(who, 200)},
              {"title": "Asked at", "value": when(job.created_at)},
              {"title": "Expires", "value": when(expires_at(job))}]
    body: list[JSON] = [
        {"type": "TextBlock", "text": "✋ Approval needed", "weight": "Bolder", "size": "Medium", "wrap": True},
        {"type": "TextBlock", "wrap": True,
         "text": f"{shown(who, 200)} asked me to run **{shown(tool_title(job.tool))}**. Nothing runs until "
                 "it is approved."},
        {"type": "FactSet", "facts": facts},
    ]
    if notice:
        body.append({"type": "TextBlock", "text": notice, "wrap": True, "color": "attention", "weight": "Bolder"})
    return adaptive_card(body, [_button("Approve", APPROVE_VERB, job, "positive"),
                                _button("Reject", REJECT_VERB, job, "destructive")])


def card_for(job: JobRecord, *, notice: str | None = None) -> JSON:
    """The card a job shows now: the approval card while it awaits, else the live job card."""
    return approval_card(job, notice=notice) if job.status == AWAITING else job_card(job, notice=notice)


def card_for_activity(job: JobRecord) -> JSON:
    summary = "Approval needed" if job.status == AWAITING else job.status
    return card_activity(card_for(job), summary=f"{tool_title(job.tool)[:100]}: {summary}")


def parse_decision(value: Any) -> tuple[str, bool] | None:
    """``(job id, approve?)`` from an Approve / Reject click (Action.Execute data or Action.Submit value)."""
    if isinstance(value, dict) and value.get("action") in (APPROVE_VERB, REJECT_VERB) \
            and isinstance(value.get("jobId"), str):
        return str(value["jobId"]), value["action"] == APPROVE_VERB
    return None
