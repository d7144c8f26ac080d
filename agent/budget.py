"""Daily model-token budgets: per tenant and per conversation, renewed at midnight UTC.

What is counted is what the model service reports for each call (``CreateResult.usage``:
prompt and completion tokens; agent/models.py ``ModelCallRecorder`` adds them up per turn).
The runner (agent/runner.py) asks :meth:`TokenBudget.exhausted` before a turn calls the model and
:meth:`TokenBudget.spend` after it, whether the turn succeeded or not (a failed turn's calls cost
too). A spent budget turns the turn into an :class:`~agent.turns.AgentError` with a message saying
when it renews; the model is not called. A turn is checked before it starts, so it can overshoot
the budget by what it uses itself (a few thousand tokens).

The tallies are the store's key/value items ``budget/<scope>/<id>/<UTC date>`` (``tokens``,
``prompt``, ``completion``), durable across restarts and visible to every instance; old days
expire with the other items (``CONVERSATION_TTL_DAYS``). Writers: turns run only on the active
worker, and a conversation's turns one at a time, so a conversation's tally has one writer; the
conversations of one tenant run concurrently in that process, so each tally's read-add-write holds
a lock (striped by key). Two workers active at once (a takeover while the old one still runs a
turn) could lose one turn's addition: an undercount of one turn at most, not a bypass.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from runtime import metrics
from storage.abc import JSON, ConversationStore

log = logging.getLogger(__name__)

Clock = Callable[[], float]
_LOCK_STRIPES = 64


def count_tokens(prompt: int, completion: int) -> None:
    """``teams_agent_model_tokens_total``: every turn's usage, budgets or not."""
    if prompt:
        metrics.MODEL_TOKENS.labels("prompt").inc(prompt)
    if completion:
        metrics.MODEL_TOKENS.labels("completion").inc(completion)


def _until(delta: timedelta) -> str:
    minutes = max(1, int(delta.total_seconds() // 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


@dataclass(frozen=True)
class Exhausted:
    """A budget that is spent: which, how much was used of how much, and when it renews."""

    scope: str  # "tenant" | "conversation"
    scope_id: str
    used: int
    budget: int
    now: datetime
    renews_at: datetime  # the next midnight UTC

    @property
    def _renewal(self) -> str:
        return f"at midnight UTC (in {_until(self.renews_at - self.now)})"

    @property
    def user_message(self) -> str:
        whose = "this conversation" if self.scope == "conversation" else "your organisation"
        return (f"Sorry, {whose} has used up today's model budget ({self.budget:,} tokens), so I can't answer with "
                f"the model until it renews {self._renewal}. Commands such as `help` and `jobs` still work, and "
                "I'll still tell you when background jobs finish.")

    @property
    def job_result_message(self) -> str:
        """Said before a job's outcome, which the processor then gives as it came (plain_job_outcome)."""
        return f"(Today's model budget is used up; it renews {self._renewal}. Here is a job's outcome as it came in.)"

    @property
    def log_line(self) -> str:
        return (f"daily token budget of {self.scope} {self.scope_id!r} spent ({self.used:,} of {self.budget:,} "
                f"tokens); the model is not called until {self.renews_at:%Y-%m-%d %H:%M} UTC")


class TokenBudget:
    def __init__(self, store: ConversationStore, *, per_tenant: int = 0, per_conversation: int = 0,
                 clock: Clock = time.time) -> None:
        """Budgets in tokens per UTC day; 0 = unlimited."""
        self._store = store
        self.per_tenant = per_tenant
        self.per_conversation = per_conversation
        self._clock = clock
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]

    @property
    def enabled(self) -> bool:
        return self.per_tenant > 0 or self.per_conversation > 0

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    @staticmethod
    def item_key(scope: str, scope_id: str, day: str) -> str:
        return f"budget/{scope}/{scope_id}/{day}"

    async def _scopes(self, conversation_key: str, tenant_id: str) -> list[tuple[str, str, int]]:
        """(scope, id, budget) of each budget that applies."""
        scopes = []
        if self.per_conversation > 0:
            scopes.append(("conversation", conversation_key, self.per_conversation))
        if self.per_tenant > 0 and (tenant := tenant_id or await self._tenant_of(conversation_key)):
            scopes.append(("tenant", tenant.lower(), self.per_tenant))
        return scopes

    async def _tenant_of(self, conversation_key: str) -> str:
        """A job result has no sender: the tenant is the conversation's, from its stored reference."""
        reference = await self._store.get_reference(conversation_key) or {}
        conversation = reference.get("conversation")
        tenant = conversation.get("tenantId") if isinstance(conversation, dict) else None
        return tenant if isinstance(tenant, str) else ""

    async def exhausted(self, conversation_key: str, tenant_id: str = "") -> Exhausted | None:
        """The first spent budget that applies to this conversation today, or None."""
        if not self.enabled:
            return None
        now = self._now()
        day = f"{now:%Y-%m-%d}"
        scopes = await self._scopes(conversation_key, tenant_id)
        items = await self._store.read_items([self.item_key(s, i, day) for s, i, _ in scopes])
        for scope, scope_id, budget in scopes:
            used = _tokens(items.get(self.item_key(scope, scope_id, day)))
            if used >= budget:
                midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
                metrics.BUDGET_EXHAUSTED.labels(scope).inc()
                return Exhausted(scope, scope_id, used, budget, now, midnight)
        return None

    async def spend(self, conversation_key: str, tenant_id: str, prompt: int, completion: int) -> None:
        """Add a turn's usage to today's tallies of the budgets that apply."""
        if not self.enabled or prompt + completion <= 0:
            return
        day = f"{self._now():%Y-%m-%d}"
        for scope, scope_id, _ in await self._scopes(conversation_key, tenant_id):
            key = self.item_key(scope, scope_id, day)
            async with self._locks[zlib.crc32(key.encode()) % _LOCK_STRIPES]:
                item = (await self._store.read_items([key])).get(key) or {}
                await self._store.write_items({key: {
                    "tokens": _tokens(item) + prompt + completion,
                    "prompt": _count(item, "prompt") + prompt,
                    "completion": _count(item, "completion") + completion,
                }})

    async def used(self, scope: str, scope_id: str) -> int:
        """Today's tally (tests, operators)."""
        key = self.item_key(scope, scope_id, f"{self._now():%Y-%m-%d}")
        return _tokens((await self._store.read_items([key])).get(key))


def _count(item: JSON | None, name: str) -> int:
    value = (item or {}).get(name)
    return value if isinstance(value, int) and value > 0 else 0


def _tokens(item: JSON | None) -> int:
    return _count(item, "tokens")
