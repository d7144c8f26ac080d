"""Ingest limits: token buckets per sender and per conversation, and a cap on a conversation's inbox.

Checked for every message activity before anything is stored (bot/handler.py), so a flood costs
no store write, no model call and, past the first refusal, no reply:

- **per sender** (``RATE_LIMIT_USER_BURST`` messages at once, refilled at
  ``RATE_LIMIT_USER_PER_MINUTE``), across all the sender's conversations. The sender is the
  Entra ID (AAD) object id when the channel gives one (Teams does), else the channel account id;
- **per conversation** (``RATE_LIMIT_CONVERSATION_BURST`` / ``_PER_MINUTE``): a group chat or a
  channel has many senders, each within their own limit;
- **pending inbox** (``MAX_PENDING_EVENTS``): a conversation whose unprocessed events already
  reach the cap takes no more messages until the agent has caught up (a slow or failing model
  must not let the inbox grow without bound). Read from the store, so it holds across instances.
  A process that is the only one taking messages in for its store (``ROLE=all`` without a PostgreSQL
  ``JOB_STORE_URL``: one instance per store) counts once and then spends the room the count left,
  one message at a time, before it counts again: pending events only grow through its own appends,
  so the cap holds without a store round trip per message (events the jobs append, bounded by the
  job caps, are not spent from it).

Every number 0 turns its limit off (for a bucket: either of its two numbers). A refused message
is not stored: its activity id is not recorded either, so a redelivery of it is judged again
(and answered if the bucket has refilled meanwhile, which is no duplicate: it was never answered).

The sender hears about it **once per limited stretch**: the first refusal answers with a short
notice, later ones are silent until the bucket is full again (the sender paused long enough to
refill it) or, for the inbox, until a message of that conversation is taken in again.

The buckets live in this process: with several web instances (``--role web``) behind a load
balancer each has its own, so a sender spread over N instances gets up to N times the rate.
The inbox cap, read from the shared store, bounds what reaches the agent whatever the instances.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from runtime import metrics
from runtime.protocol import Requester
from storage.abc import ConversationLog

log = logging.getLogger(__name__)

Clock = Callable[[], float]

#: Above this many tracked ids per scope, buckets that have refilled are forgotten (a full bucket
#: is what a new one would be): memory stays bounded by the senders active within a refill time.
MAX_TRACKED = 10_000


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``per_second``; each message takes one."""

    __slots__ = ("capacity", "noticed", "per_second", "tokens", "updated")

    def __init__(self, capacity: float, per_second: float, now: float) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self.tokens = capacity
        self.updated = now
        self.noticed = False  # the sender was told about this limited stretch

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.per_second)
        self.updated = now
        if self.full:
            self.noticed = False  # the stretch is over: a new one gets its own notice

    @property
    def full(self) -> bool:
        return self.tokens >= self.capacity

    @property
    def seconds_to_next(self) -> float:
        """How long until one message is allowed again."""
        return max(0.0, (1.0 - self.tokens) / self.per_second)


class Buckets:
    """The buckets of one scope, by id; disabled when ``burst`` or ``per_minute`` is 0."""

    def __init__(self, burst: int, per_minute: float, clock: Clock) -> None:
        self.burst = burst
        self.per_second = per_minute / 60.0
        self.enabled = burst > 0 and per_minute > 0
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_at = MAX_TRACKED

    def bucket(self, key: str) -> TokenBucket:
        """The id's bucket, refilled to now."""
        now = self._clock()
        found = self._buckets.get(key)
        if found is None:
            if len(self._buckets) >= self._prune_at:
                self._prune(now)
            found = self._buckets[key] = TokenBucket(self.burst, self.per_second, now)
        found.refill(now)
        return found

    def _prune(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.full:
                del self._buckets[key]
        self._prune_at = max(MAX_TRACKED, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class Refusal:
    """A message not taken in: which limit refused it, and what to tell the sender (None: nothing,
    they were told earlier in this limited stretch)."""

    scope: str  # "user" | "conversation" | "inbox"
    notice: str | None


def _seconds(value: float) -> str:
    seconds = max(1, math.ceil(value))
    return "a second" if seconds == 1 else f"{seconds} seconds"


def sender_id(who: Requester) -> str:
    """The sender a bucket belongs to: the Entra ID object id (one person on every channel account
    Teams gives them), else the channel account id."""
    return who.aad_object_id or who.id


class IngestLimits:
    def __init__(
        self,
        store: ConversationLog,
        *,
        user_burst: int = 10,
        user_per_minute: float = 20,
        conversation_burst: int = 30,
        conversation_per_minute: float = 60,
        max_pending_events: int = 50,
        sole_ingest: bool = False,
        clock: Clock = time.monotonic,
    ) -> None:
        """``sole_ingest``: no other process appends messages to this store (see the module's docstring)."""
        self._store = store
        self.users = Buckets(user_burst, user_per_minute, clock)
        self.conversations = Buckets(conversation_burst, conversation_per_minute, clock)
        self.max_pending_events = max_pending_events
        self._inbox_noticed: set[str] = set()
        self._sole_ingest = sole_ingest
        self._room: dict[str, int] = {}  # conversation -> messages it may still take in before the next count

    async def refuse(self, conversation_key: str, who: Requester) -> Refusal | None:
        """None when the message may be taken in (it then counts against the buckets), else why not."""
        refusal = self._rate(conversation_key, sender_id(who))
        if refusal is None and self.max_pending_events > 0:
            refusal = await self._inbox(conversation_key)
        if refusal is not None:
            metrics.RATE_LIMITED.labels(refusal.scope).inc()
            log.log(logging.INFO if refusal.notice else logging.DEBUG,
                    "message from %r in %s refused by the %s limit%s", sender_id(who), conversation_key,
                    refusal.scope, " (told once)" if refusal.notice else "")
        return refusal

    def _rate(self, conversation_key: str, sender: str) -> Refusal | None:
        user = self.users.bucket(sender) if self.users.enabled else None
        conversation = self.conversations.bucket(conversation_key) if self.conversations.enabled else None
        if user is not None and user.tokens < 1:
            return Refusal("user", None if _told(user) else (
                "You're sending me messages faster than I can keep up with, so I've skipped this one (and I'll "
                f"skip the next ones without saying so). Please wait {_seconds(user.seconds_to_next)}, then "
                "send it again."))
        if conversation is not None and conversation.tokens < 1:
            return Refusal("conversation", None if _told(conversation) else (
                "This conversation is sending me messages faster than I can keep up with, so I've skipped this "
                f"one (and I'll skip the next ones without saying so). Please wait "
                f"{_seconds(conversation.seconds_to_next)}, then send it again."))
        # Only a message both allow takes a token from each: a refused one costs the other nothing.
        for bucket in (user, conversation):
            if bucket is not None:
                bucket.tokens -= 1
        return None

    async def _inbox(self, conversation_key: str) -> Refusal | None:
        if self._room.get(conversation_key, 0) > 0:
            self._room[conversation_key] -= 1
            return None
        pending = await self._store.count_pending_events(conversation_key)
        if pending < self.max_pending_events:
            self._inbox_noticed.discard(conversation_key)
            if self._sole_ingest:
                if len(self._room) >= MAX_TRACKED:
                    self._room.clear()  # at worst a conversation is counted again
                self._room[conversation_key] = self.max_pending_events - pending - 1  # after this message
            return None
        if conversation_key in self._inbox_noticed:
            return Refusal("inbox", None)
        if len(self._inbox_noticed) >= MAX_TRACKED:
            self._inbox_noticed.clear()  # at worst someone is told twice
        self._inbox_noticed.add(conversation_key)
        return Refusal("inbox", "I'm still working through the earlier messages of this conversation, so I've "
                                "skipped this one. Please send it again once I've answered.")


def _told(bucket: TokenBucket) -> bool:
    """Whether the sender was already told in this stretch (and mark them told)."""
    told, bucket.noticed = bucket.noticed, True
    return told
