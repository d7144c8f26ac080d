"""The Teams-aware activity handler: the ingest side of the durability protocol (step 1).

Every activity's conversation reference is stored; a user message is appended to the
conversation's inbox (its activity id makes a redelivery a no-op) before the HTTP answer,
and the conversation's processor is woken. The agent never runs inside the request.
"""

from __future__ import annotations

import logging
from typing import Any

from botbuilder.core import InvokeResponse, TurnContext
from botbuilder.core.teams import TeamsActivityHandler
from botbuilder.schema import Activity, AdaptiveCardInvokeResponse, AdaptiveCardInvokeValue, ChannelAccount

from agent.forgetting import reset_payload
from bot.approvals import ApprovalClicks
from bot.auth import TenantPolicy, activity_tenants
from bot.cards import CANCEL_VERB, CARD_CONTENT_TYPE, job_card, notice_card, parse_cancel
from bot.dialog_storage import dialog_item_key
from bot.feedback import SUBMIT_ACTION, Feedback, FeedbackError, feedback_item_key
from bot.keys import conversation_key
from bot.rate_limits import IngestLimits
from bot.service_urls import ServiceUrlPolicy
from dialogs.buttons import said_text
from dialogs.commands import CancelJob, CommandDialogs, cancel_reply
from jobs.access import CancelRefusedError
from runtime import tracing
from runtime.protocol import WELCOME_EVENT_ID, EventKind, Requester, message_event_id, reset_event_id
from runtime.untrusted import inline_code
from storage.abc import JSON, ConversationStore, InboxEvent, JobNotFoundError
from storage.inbox import Inbox

log = logging.getLogger(__name__)

GROUP_CONVERSATION_TYPES = {"channel", "groupChat"}


def message_text(activity: Activity) -> str:
    """The user's text with the bot's @mention removed (channels and group chats)."""
    text = activity.text or said_text(activity.value) or ""  # a say_action click in the Playground
    bot_id = getattr(activity.recipient, "id", None)
    # Read the entities defensively (not TurnContext.get_mentions): a channel may send odd shapes.
    for entity in activity.entities or []:
        if getattr(entity, "type", None) != "mention":
            continue
        extra = getattr(entity, "additional_properties", None) or {}
        mentioned, mention_text = extra.get("mentioned"), extra.get("text")
        if isinstance(mentioned, dict) and mentioned.get("id") == bot_id and isinstance(mention_text, str):
            text = text.replace(mention_text, "")
    return " ".join(text.split())


def requester(activity: Activity) -> Requester:
    """Who sent this activity (the edge has authenticated the channel that vouches for it)."""
    sender = activity.from_property
    tenants = sorted(activity_tenants(activity))
    conversation_type = getattr(activity.conversation, "conversation_type", None)
    return Requester(
        id=str(getattr(sender, "id", None) or ""),
        name=str(getattr(sender, "name", None) or ""),
        aad_object_id=str(getattr(sender, "aad_object_id", None) or ""),
        tenant_id=tenants[0] if tenants else "",
        conversation_type=conversation_type if isinstance(conversation_type, str) else "",
    )


def _redelivered(event_id: str, key: str) -> None:
    log.info("activity %s in %s was already received; ignoring the redelivery", event_id, key)


class TeamsBot(TeamsActivityHandler):
    def __init__(
        self,
        store: ConversationStore,
        inbox: Inbox,
        commands: CommandDialogs,
        cancel_job: CancelJob,
        *,
        service_urls: ServiceUrlPolicy,
        tenants: TenantPolicy | None = None,
        limits: IngestLimits | None = None,
        approvals: ApprovalClicks | None = None,
        feedback: Feedback | None = None,
    ) -> None:
        self._feedback = feedback  # None: feedback invokes are not answered (unit tests)
        self._service_urls = service_urls
        self._tenants = tenants or TenantPolicy()
        self._limits = limits  # None: no rate limits, no inbox cap (unit tests)
        self._store = store
        self._inbox = inbox
        self._commands = commands
        self._cancel_job = cancel_job
        self._approvals = approvals  # issue 16: Approve / Reject on approval cards
        self._saved_references: dict[str, JSON] = {}

    async def on_turn(self, turn_context: TurnContext) -> None:
        activity = turn_context.activity
        if not self._tenants.allows(activity):  # ALLOWED_TENANTS: a polite no, and nothing stored
            await self._tenants.refuse(turn_context)
            return
        # Defence in depth (the edge refuses these first): a reference naming an untrusted connector never
        # replaces the stored one.
        if not self._service_urls.check(activity.service_url, where="store",
                                        consequence="the activity is ignored and its reference not stored"):
            return
        key = conversation_key(activity)
        reference = TurnContext.get_conversation_reference(activity).serialize()
        # Without the triggering activity's id (proactive sends post into the conversation, a Teams
        # thread being a conversation of its own), the reference rarely changes: write (and fsync)
        # only when it differs from what this process last stored.
        reference.pop("activityId", None)
        if self._saved_references.get(key) != reference:
            await self._store.save_reference(key, reference)
            self._saved_references[key] = reference
        await super().on_turn(turn_context)

    async def on_message_activity(self, turn_context: TurnContext) -> None:
        activity = turn_context.activity
        key = conversation_key(activity)
        # RATE_LIMIT_*, MAX_PENDING_EVENTS: a refused message is not stored; the sender is told once.
        if self._limits is not None and (refused := await self._limits.refuse(key, requester(activity))):
            if refused.notice:
                try:  # a notice is a courtesy: a connector failure must not fail the request
                    await turn_context.send_activity(refused.notice)
                except Exception as exc:
                    log.warning("could not send the rate-limit notice to %s: %s", key, exc)
            return
        event_id = message_event_id(activity.id)
        text = message_text(activity)
        # What is answered here, inline (a click, a command, the answer to the reset question), checks for a
        # redelivery first; a message for the agent is only appended, and the append ignores an id it holds.
        if (activity.value is not None or self._commands.answers_inline(text)) and \
                await self._store.has_event(key, event_id):
            _redelivered(event_id, key)
            return
        if self._approvals is not None and (decided := await self._approvals.on_submit(
                turn_context, key, activity.value, requester(activity))) is not None:  # Approve / Reject fallback
            await self._inbox.post(key, InboxEvent(id=event_id, kind=EventKind.COMMAND, payload={"decided": decided}))
            return
        if (job_id := parse_cancel(activity.value)) is not None:  # Action.Submit fallback of Cancel
            await turn_context.send_activity(await cancel_reply(self._cancel_job, key, job_id, requester(activity)))
            await self._inbox.post(key, InboxEvent(id=event_id, kind=EventKind.COMMAND, payload={"cancel": job_id}))
            return
        if await self._commands.handle(turn_context, text, requester(activity)):
            # Record handled commands too, so a redelivered one is not answered twice.
            await self._inbox.post(key, InboxEvent(id=event_id, kind=EventKind.COMMAND, payload={"text": text}))
            return
        payload: JSON = {"text": text, "from": requester(activity).to_json()}
        if trace_context := tracing.carrier():  # lets the worker's turn span link back to this one
            payload[tracing.CARRIER_KEY] = trace_context
        if not await self._inbox.post(key, InboxEvent(id=event_id, kind=EventKind.MESSAGE, payload=payload)):
            _redelivered(event_id, key)

    async def on_invoke_activity(self, turn_context: TurnContext) -> InvokeResponse:
        activity = turn_context.activity
        if activity.name == SUBMIT_ACTION and self._feedback is not None:  # thumbs up / down: bot/feedback.py
            try:
                await self._feedback.submit(conversation_key(activity), activity.reply_to_id, activity.value,
                                            requester(activity))
            except FeedbackError as refused:
                return InvokeResponse(status=refused.status, body={"code": "BadRequest" if refused.status == 400
                                                                   else "NotFound", "message": str(refused)})
            return InvokeResponse(status=200, body={})
        return await super().on_invoke_activity(turn_context)

    async def on_adaptive_card_invoke(self, turn_context: TurnContext,
                                      invoke_value: AdaptiveCardInvokeValue) -> AdaptiveCardInvokeResponse:
        """Action.Execute from a card, answered inline with the refreshed card."""
        action: Any = invoke_value.action  # botbuilder leaves it a plain dict
        verb = action.get("verb") if isinstance(action, dict) else getattr(action, "verb", None)
        data = action.get("data") if isinstance(action, dict) else getattr(action, "data", None)
        if self._approvals is not None and (answer := await self._approvals.on_invoke(
                conversation_key(turn_context.activity), verb, data, requester(turn_context.activity))) is not None:
            return answer
        job_id = parse_cancel(data) if verb == CANCEL_VERB else None
        if job_id is None:
            return AdaptiveCardInvokeResponse(status_code=400, type="application/vnd.microsoft.error",
                                              value={"code": "BadRequest", "message": "unknown card action"})
        key = conversation_key(turn_context.activity)
        try:
            job = (await self._cancel_job(key, job_id, requester(turn_context.activity))).job
        except CancelRefusedError as refused:  # the card stays as it is, with the reason on top
            return AdaptiveCardInvokeResponse(status_code=200, type=CARD_CONTENT_TYPE,
                                              value=job_card(refused.job, notice=str(refused)))
        except JobNotFoundError:
            # A card, not a message: botbuilder 4.17 cannot serialise a plain-text invoke value.
            return AdaptiveCardInvokeResponse(status_code=200, type=CARD_CONTENT_TYPE,
                                              value=notice_card(f"There is no job {inline_code(job_id)} in this "
                                                                "conversation."))
        return AdaptiveCardInvokeResponse(status_code=200, type=CARD_CONTENT_TYPE, value=job_card(job))

    async def on_members_added_activity(self, members_added: list[ChannelAccount], turn_context: TurnContext) -> None:
        activity = turn_context.activity
        bot_id = activity.recipient.id if activity.recipient else None
        if any(member.id != bot_id for member in members_added) or (
            activity.channel_id == "msteams" and any(member.id == bot_id for member in members_added)
        ):
            await self._welcome(turn_context)

    async def on_installation_update_add(self, turn_context: TurnContext) -> None:
        await self._welcome(turn_context)

    async def _welcome(self, turn_context: TurnContext) -> None:
        key = conversation_key(turn_context.activity)
        # One welcome per conversation, however many join events arrive.
        await self._inbox.post(key, InboxEvent(id=WELCOME_EVENT_ID, kind=EventKind.WELCOME, payload={}))


async def request_reset(inbox: Inbox, turn_context: TurnContext) -> None:
    """The reset dialog's ``on_reset``, once the user confirmed: the reset goes to the inbox, and the
    processor forgets the conversation in order with what came before it."""
    activity = turn_context.activity
    payload = reset_payload(requester(activity), [dialog_item_key(activity),
                                                  feedback_item_key(conversation_key(activity))])
    await inbox.post(conversation_key(activity), InboxEvent(id=reset_event_id(activity.id), kind=EventKind.RESET,
                                                            payload=payload))
