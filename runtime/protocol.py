"""The durability protocol's vocabulary: what the edge, the processor and the jobs say to each other.

The bottom layer (it imports nothing of this repository), so every layer can name these without
importing the layer that produces or consumes them:

- :class:`EventKind`: the kinds of inbox event (``InboxEvent.kind``);
- the id conventions: an inbox event's id is its idempotency key (appending it twice is a no-op),
  an outbox message's id names the event whose turn wrote it (so a crash repeats it at most once);
- :class:`Requester` (who asked), :class:`JobResult` (a finished job's outcome, the payload of a
  ``job_finished`` event), with explicit JSON forms: stored payloads are the contract;
- :class:`MessageSender` / :class:`DeliveryError`: the channel, as the processor sees it;
- :class:`ReplyStreams` / :class:`ReplyStream` / :class:`StreamOutcome`: a reply streamed while its
  turn runs (the Teams protocol is ``bot.streaming``), and :data:`STREAM_NOTE`, the annotation of
  the inbox event whose turn opened a stream (so a re-run turn after a crash can finish it).

Stored events and outbox messages written by earlier versions use these same strings.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

JSON = dict[str, Any]


class EventKind(StrEnum):
    """What an inbox event is. A ``StrEnum``: the stored ``kind`` is the plain string, and an event
    loaded from a store (a ``str``) compares equal to its member."""

    MESSAGE = "message"  # a user's message for the agent
    COMMAND = "command"  # answered inline by a dialog; recorded only so a redelivery is ignored
    WELCOME = "welcome"  # the bot joined the conversation: post the welcome card (once)
    RESET = "reset"  # a confirmed reset: clear the agent's state, forget the old texts
    JOB_FINISHED = "job_finished"  # a job's outcome (payload: :meth:`JobResult.to_json`)
    APPROVAL = "approval"  # a person decided a job awaiting approval (payload: job id, decision, by, at)


#: The kinds that run an agent turn (the others are answered without the model).
AGENT_KINDS = (EventKind.MESSAGE, EventKind.JOB_FINISHED, EventKind.APPROVAL)


# --- conversation keys ---
def conversation_key(channel_id: str | None, conversation_id: str | None) -> str:
    """A conversation's store key, unique across channels (one conversation id could exist on two).

    A Teams channel thread (``19:...@thread.tacv2;messageid=...``) is a conversation of its own.
    """
    return f"{channel_id}:{conversation_id}"


# --- inbox event ids (the idempotency keys) ---
#: The one welcome event of a conversation: however many join events arrive, one welcome.
WELCOME_EVENT_ID = "welcome"
_NO_ID = "noid-"
_JOB = "job:"
_RESET = "reset:"
_APPROVAL = "approval:"


def message_event_id(activity_id: str | None) -> str:
    """A message's event id: its activity id (a redelivery is a no-op), or a fresh ``noid-<hex>``
    for a channel that sends none (then a redelivery cannot be recognised)."""
    return activity_id or f"{_NO_ID}{uuid.uuid4().hex}"


def finished_event_id(job_id: str) -> str:
    """``job:<job id>``: a re-run job's second announcement appends nothing."""
    return f"{_JOB}{job_id}"


def approval_event_id(job_id: str) -> str:
    """``approval:<job id>``: a job's approval is decided once, so it is announced once."""
    return f"{_APPROVAL}{job_id}"


def reset_event_id(activity_id: str | None) -> str:
    """``reset:<activity id>`` (a fresh hex without one): the reset confirmed by that activity."""
    return f"{_RESET}{activity_id or uuid.uuid4().hex}"


# --- outbox message ids ---
_CARD = "card:"


def reply_id(event_id: str, n: int | str) -> str:
    """``<event id>#<n>``: the n-th message of the turn that processed the event (``n`` may be a
    word, e.g. ``too-large``)."""
    return f"{event_id}#{n}"


def replied_event_id(message_id: str) -> str | None:
    """The event a :func:`reply_id` answers (None for a message that answers no event, a card)."""
    event_id, hash_, _ = message_id.rpartition("#")
    return event_id if hash_ else None


def is_reset_reply(message_id: str) -> bool:
    """A message of a reset's turn (its confirmation): the old texts are forgotten before it is sent."""
    return message_id.startswith(_RESET)


def card_message_id(job_id: str) -> str:
    """``card:<job id>``: the live card posted for a new job."""
    return f"{_CARD}{job_id}"


def card_job_id(message_id: str) -> str | None:
    """The job a :func:`card_message_id` shows, or None for any other message."""
    return message_id.removeprefix(_CARD) if message_id.startswith(_CARD) else None


# --- who asked ---
@dataclass(frozen=True)
class Requester:
    """Who sent a message, as the edge authenticated it: the channel account id, the display name,
    the Entra ID (AAD) object id and tenant when the channel gives them (Teams does), and the kind
    of conversation (``personal``, ``groupChat``, ``channel``; empty when the channel says none)."""

    id: str = ""
    name: str = ""
    aad_object_id: str = ""
    tenant_id: str = ""
    conversation_type: str = ""

    @property
    def shared_conversation(self) -> bool:
        """A group chat or a channel: other people see what the bot says and can click its cards."""
        return self.conversation_type in ("groupChat", "channel")

    @property
    def label(self) -> str:
        """How to name this person to others: the display name, else the id."""
        return self.name or self.aad_object_id or self.id or "someone"

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "aadObjectId": self.aad_object_id, "tenantId": self.tenant_id,
                "conversationType": self.conversation_type}

    @classmethod
    def from_json(cls, data: Any) -> Requester:
        """From :meth:`to_json` (or an older payload's ``{"id", "name"}``); anything else is nobody."""
        if not isinstance(data, dict):
            return cls()

        def text(name: str) -> str:
            value = data.get(name)
            return value if isinstance(value, str) else ""

        return cls(text("id"), text("name"), text("aadObjectId"), text("tenantId"), text("conversationType"))


# --- a finished job ---
@dataclass(frozen=True)
class JobResult:
    """A finished job's outcome: the payload of its ``job_finished`` event, and (as JSON) the tool
    result the model reads."""

    job_id: str
    call_id: str | None  # the tool call that started the job (None: unknown)
    tool: str
    status: str  # succeeded | failed | cancelled
    content: str  # JSON text the tool produced, or the error
    is_error: bool
    arguments: dict[str, Any]

    def to_json(self) -> JSON:
        return {
            "job_id": self.job_id,
            "call_id": self.call_id,
            "tool": self.tool,
            "arguments": self.arguments,
            "status": self.status,
            "is_error": self.is_error,
            "content": self.content,
        }

    @classmethod
    def from_json(cls, data: Any) -> JobResult:
        """From :meth:`to_json` (``call_id`` and ``arguments`` may be missing). Raises ValueError
        for anything else."""
        try:
            call_id = data.get("call_id")
            return cls(
                job_id=str(data["job_id"]),
                call_id=None if call_id is None else str(call_id),
                tool=str(data["tool"]),
                status=str(data["status"]),
                content=str(data["content"]),
                is_error=bool(data["is_error"]),
                arguments=dict(data.get("arguments") or {}),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a job result: {exc!r}") from exc


# --- ownership (issue 18) ---
class NotOwner(Exception):
    """This worker no longer owns the conversation (its partition's lease ran out, or a newer owner
    wrote it): drop the work without writing or sending anything; the new owner carries it on.
    ``by``: who caught it, ``lease`` (this process's monotonic deadline) or ``store`` (the epoch fence)."""

    by = "lease"

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"conversation {key!r}: {reason}")
        self.key = key


class Owner(Protocol):
    """Which conversations this worker owns (cluster.Ownership; issue 18): the processor and the job
    runner ask it before they act."""

    def owns(self, key: str) -> bool: ...

    def fence(self, key: str) -> int | None: ...


class EveryConversation:
    """One process: it owns every conversation, nothing is fenced."""

    def owns(self, key: str) -> bool:
        return True

    def fence(self, key: str) -> int | None:
        return None


# --- the channel ---
class DeliveryError(Exception):
    """The channel did not accept an activity. ``permanent``: retrying cannot help (the bot was
    removed, the activity is malformed); ``retry_after``: seconds the channel asked to wait."""

    def __init__(self, message: str, *, permanent: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


class MessageSender(Protocol):
    """How the processor delivers its outbox (the edge implements it: ``bot.sender``)."""

    async def send(self, reference: JSON, activity: JSON) -> str | None:
        """Deliver one activity proactively; return its id. Raises DeliveryError."""

    async def typing(self, reference: JSON) -> None:
        """Best-effort typing indicator."""


# --- streaming a reply while its turn runs ---
#: The annotation (:meth:`storage.abc.ConversationLog.annotate_event`) of an inbox event whose turn
#: opened a stream: ``{"id": <stream id>, "at": <unix time it opened>}``.
STREAM_NOTE = "stream"


@dataclass(frozen=True)
class StreamOutcome:
    """How a turn's stream ended, which decides the shape of its final message.

    ``stream_id``: the open stream the final message must close (None: send it as a plain message).
    ``shown``: text the stream already closed with (its time limit came first): the final message
    carries only what follows it.
    """

    stream_id: str | None = None
    shown: str = ""


class ReplyStream(Protocol):
    """One turn's stream; ``informative`` and ``text`` only note the latest (never block), the
    stream sends at the pace the channel allows."""

    def informative(self, text: str) -> None: ...

    def text(self, so_far: str) -> None: ...

    async def finish(self) -> StreamOutcome:
        """Stop sending (waits for a send in flight) and say how the final message must look."""


#: Called once with the stream id, before the first text chunk: record it durably.
StreamStarted = Callable[[str], Awaitable[None]]


class ReplyStreams(Protocol):
    """Where replies can be streamed (the edge implements it: ``bot.streaming``)."""

    def streams_to(self, reference: JSON) -> bool:
        """Whether the conversation supports streaming (Teams: one-on-one chats only)."""

    def open(self, reference: JSON, on_started: StreamStarted) -> ReplyStream: ...
