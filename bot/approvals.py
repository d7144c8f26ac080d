"""Approve / Reject clicks on an approval card (issue 16), as the edge receives them.

Teams sends an ``Action.Execute`` click as an ``adaptiveCard/action`` invoke: it is answered
inline with the card as it now stands (for the clicker; everyone else's copy is updated by the
card updater when the decision is taken, jobs/approval.py ``on_decided``). A client without
Universal Actions sends the ``Action.Submit`` fallback as a message with ``value``: it is answered
with a message. The decision itself is :meth:`jobs.approval.Approvals.decide`: who may, and the
claim that makes a double click or a redelivered invoke decide once.

A refused person (not the requester, not in APPROVERS) gets the refusal on their copy of the card
only (the invoke response); the request stays open for the others.
"""

from __future__ import annotations

import logging
from typing import Any

from botbuilder.core import TurnContext
from botbuilder.schema import AdaptiveCardInvokeResponse

from bot.approval_cards import APPROVE_VERB, REJECT_VERB, approval_card, card_for, parse_decision
from bot.cards import CARD_CONTENT_TYPE, notice_card
from jobs.approval import ApprovalRefusedError, Approvals
from runtime import metrics
from runtime.protocol import Requester
from runtime.untrusted import escape_markdown, inline_code
from storage.abc import JobNotFoundError

log = logging.getLogger(__name__)


def _card(card: dict[str, Any]) -> AdaptiveCardInvokeResponse:
    return AdaptiveCardInvokeResponse(status_code=200, type=CARD_CONTENT_TYPE, value=card)


class ApprovalClicks:
    def __init__(self, approvals: Approvals) -> None:
        self._approvals = approvals

    async def on_invoke(self, key: str, verb: Any, data: Any,
                        requester: Requester) -> AdaptiveCardInvokeResponse | None:
        """The answer to an Approve / Reject invoke; None for any other verb (not ours)."""
        if verb not in (APPROVE_VERB, REJECT_VERB):
            return None
        parsed = parse_decision({**data, "action": verb} if isinstance(data, dict) else None)
        if parsed is None:
            return AdaptiveCardInvokeResponse(status_code=400, type="application/vnd.microsoft.error",
                                              value={"code": "BadRequest", "message": "no job id in the card action"})
        job_id, approve = parsed
        try:
            decided = await self._approvals.decide(key, job_id, approve, requester)
        except ApprovalRefusedError as refused:  # the card stays open, with the reason on the clicker's copy
            metrics.APPROVALS_REFUSED.inc()
            return _card(approval_card(refused.job, notice=str(refused)))
        except JobNotFoundError:
            return _card(notice_card(f"There is no job {inline_code(job_id)} in this conversation."))
        return _card(card_for(decided.job, notice=None if decided.won else escape_markdown(decided.message())))

    async def on_submit(self, turn_context: TurnContext, key: str, value: Any, requester: Requester) -> str | None:
        """An Action.Submit fallback click: decided and answered with a message; returns the job id, or
        None when ``value`` is no Approve / Reject click."""
        parsed = parse_decision(value)
        if parsed is None:
            return None
        job_id, approve = parsed
        try:
            reply = (await self._approvals.decide(key, job_id, approve, requester)).message()
            reply = escape_markdown(reply)
        except ApprovalRefusedError as refused:
            metrics.APPROVALS_REFUSED.inc()
            reply = str(refused)
        except JobNotFoundError:
            reply = f"There is no job {inline_code(job_id)} in this conversation."
        await turn_context.send_activity(reply)
        return job_id
