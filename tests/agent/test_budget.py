"""Daily token budgets (agent/budget.py) with a hand-driven clock, and what the runner and processor make of them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from autogen_core.models import CreateResult, LLMMessage, RequestUsage

from agent.budget import TokenBudget
from agent.offline_model import OfflineChatCompletionClient
from agent.processor import ConversationProcessor, text_activity
from agent.runner import AgentTurnRunner
from agent.turns import AgentError, AgentInput
from runtime import metrics
from runtime.protocol import Requester
from storage.abc import InboxEvent
from storage.memory import MemoryStore

KEY = "msteams:19:chat@thread.v2"
TENANT = "tenant-1"
REFERENCE = {"conversation": {"id": "19:chat@thread.v2", "tenantId": TENANT}, "serviceUrl": "http://127.0.0.1:9/"}
ADA = Requester(id="29:ada", aad_object_id="aad-ada", tenant_id=TENANT)


class Clock:
    def __init__(self, moment: str) -> None:
        self.now = datetime.fromisoformat(moment).replace(tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now


class CountingModel(OfflineChatCompletionClient):
    """The offline model, reporting usage as a real service does (prompt 100, completion 20 per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def create(self, messages: Sequence[LLMMessage], **kwargs: Any) -> CreateResult:
        self.calls += 1
        result = await super().create(messages, **kwargs)
        return result.model_copy(update={"usage": RequestUsage(prompt_tokens=100, completion_tokens=20)})


async def test_spending_adds_up_per_scope_and_day_and_zero_is_unlimited() -> None:
    store, clock = MemoryStore(), Clock("2026-12-01T10:00:00")
    budget = TokenBudget(store, per_tenant=1000, per_conversation=300, clock=clock)
    await budget.spend(KEY, TENANT, 100, 50)
    await budget.spend(KEY, TENANT, 100, 0)
    await budget.spend("msteams:other", TENANT, 400, 100)
    assert await budget.used("conversation", KEY) == 250
    assert await budget.used("tenant", TENANT) == 750
    assert await store.read_items([f"budget/conversation/{KEY}/2026-12-01"]) == {
        f"budget/conversation/{KEY}/2026-12-01": {"tokens": 250, "prompt": 200, "completion": 50}}
    assert await budget.exhausted(KEY, TENANT) is None  # 250 < 300, 750 < 1000
    await budget.spend(KEY, TENANT, 50, 0)
    spent = await budget.exhausted(KEY, TENANT)
    assert spent is not None and (spent.scope, spent.used, spent.budget) == ("conversation", 300, 300)
    unlimited = TokenBudget(store, per_tenant=0, per_conversation=0, clock=clock)
    assert not unlimited.enabled and await unlimited.exhausted(KEY, TENANT) is None


async def test_the_tenant_budget_covers_all_its_conversations() -> None:
    store, clock = MemoryStore(), Clock("2026-12-01T10:00:00")
    budget = TokenBudget(store, per_tenant=500, per_conversation=0, clock=clock)
    await budget.spend("msteams:a", TENANT, 300, 0)
    await budget.spend("msteams:b", TENANT.upper(), 200, 0)  # tenant ids compare case-insensitively
    spent = await budget.exhausted("msteams:c", TENANT)
    assert spent is not None and spent.scope == "tenant" and "your organisation" in spent.user_message
    assert await budget.exhausted("msteams:c", "another-tenant") is None


async def test_a_job_result_is_charged_to_the_tenant_of_the_conversation_reference() -> None:
    store, clock = MemoryStore(), Clock("2026-12-01T10:00:00")
    await store.save_reference(KEY, REFERENCE)
    budget = TokenBudget(store, per_tenant=100, clock=clock)
    await budget.spend(KEY, "", 100, 0)  # no sender (a job result): the reference names the tenant
    assert await budget.used("tenant", TENANT) == 100
    assert await budget.exhausted(KEY, "") is not None


async def test_the_budget_renews_at_midnight_utc_and_says_when() -> None:
    store, clock = MemoryStore(), Clock("2026-12-01T21:47:10")
    budget = TokenBudget(store, per_conversation=100, clock=clock)
    await budget.spend(KEY, TENANT, 80, 40)
    spent = await budget.exhausted(KEY, TENANT)
    assert spent is not None and spent.renews_at == datetime(2026, 12, 2, tzinfo=UTC)
    assert "midnight UTC (in 2 h 12 min)" in spent.user_message and "100 tokens" in spent.user_message
    clock.now = datetime(2026, 12, 1, 23, 59, 30, tzinfo=UTC).timestamp()
    spent = await budget.exhausted(KEY, TENANT)
    assert spent is not None and "(in 1 min)" in spent.user_message
    clock.now = datetime(2026, 12, 2, 0, 0, 1, tzinfo=UTC).timestamp()  # a new UTC day, a new tally
    assert await budget.exhausted(KEY, TENANT) is None
    assert await budget.used("conversation", KEY) == 0
    await budget.spend(KEY, TENANT, 10, 0)
    assert (await store.read_items([f"budget/conversation/{KEY}/2026-12-02"]))[
        f"budget/conversation/{KEY}/2026-12-02"]["tokens"] == 10


async def test_concurrent_spends_of_one_tenant_lose_no_tokens() -> None:
    store, clock = MemoryStore(), Clock("2026-12-01T10:00:00")
    budget = TokenBudget(store, per_tenant=10**9, clock=clock)
    await asyncio.gather(*(budget.spend(f"msteams:c{n}", TENANT, 10, 1) for n in range(50)))
    assert await budget.used("tenant", TENANT) == 550


async def test_the_runner_stops_calling_the_model_once_the_budget_is_spent() -> None:
    store, clock = MemoryStore(), Clock("2026-12-01T10:00:00")
    model = CountingModel()
    runner = AgentTurnRunner(model, lambda scope: [],
                             budget=TokenBudget(store, per_conversation=250, clock=clock))
    tokens_before = metrics.MODEL_TOKENS.labels("prompt")._value.get()
    exhausted_before = metrics.BUDGET_EXHAUSTED.labels("conversation")._value.get()
    state = None
    for text in ("my name is Ada", "what is my name?", "hello"):  # 120 tokens each: 0, 120, 240 < 250
        state = (await runner.run(KEY, state, [AgentInput(text, requester=ADA)])).state
    assert model.calls == 3
    with pytest.raises(AgentError) as caught:
        await runner.run(KEY, state, [AgentInput("and now?", requester=ADA)])
    assert caught.value.cause == "budget" and "renews at midnight UTC" in caught.value.user_message
    assert model.calls == 3  # the model was not called
    assert metrics.MODEL_TOKENS.labels("prompt")._value.get() - tokens_before == 300
    assert metrics.BUDGET_EXHAUSTED.labels("conversation")._value.get() - exhausted_before == 1


async def test_a_spent_budget_is_told_and_a_job_result_given_plainly() -> None:
    store, clock = MemoryStore(), Clock("2026-12-01T10:00:00")
    model = CountingModel()
    budget = TokenBudget(store, per_conversation=100, clock=clock)
    await budget.spend(KEY, TENANT, 100, 0)

    class Sender:
        def __init__(self) -> None:
            self.texts: list[str] = []

        async def send(self, reference: Any, activity: Any) -> str:
            self.texts.append(activity["text"])
            return "1"

        async def typing(self, reference: Any) -> None:
            return None

    sender = Sender()
    processor = ConversationProcessor(store, AgentTurnRunner(model, lambda scope: [], budget=budget), sender,
                                      welcome=lambda: text_activity("welcome"))
    await store.save_reference(KEY, REFERENCE)
    await store.append_event(KEY, InboxEvent(id="m1", kind="message",
                                             payload={"text": "hello", "from": ADA.to_json()}))
    await store.append_event(KEY, InboxEvent(id="job:j1", kind="job_finished", payload={
        "job_id": "j1", "call_id": "c1", "tool": "activate_new_line", "status": "succeeded",
        "content": '{"message": "Line 555-0100 is active."}', "is_error": False,
        "arguments": {"phone_number": "555-0100"}}))
    processor.wake(KEY)
    await processor.idle()
    assert model.calls == 0
    spent, job_note, outcome = sender.texts
    assert "used up today's model budget" in spent and "midnight UTC" in spent
    assert "Here is a job's outcome as it came in" in job_note
    assert outcome == r"Background job `j1` (`activate_new_line`) succeeded: Line 555-0100 is active."
    assert await store.count_pending_events(KEY) == 0  # told, and the conversation goes on
