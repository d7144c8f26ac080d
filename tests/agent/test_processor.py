"""The conversation processor on the memory store with a fake sender: failures never lose state."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from autogen_core.models import CreateResult, LLMMessage

from agent.offline_model import OfflineChatCompletionClient
from agent.processor import ConversationProcessor, text_activity
from agent.runner import AgentTurnRunner
from cluster.partitions import Ownership
from jobs.approval import approval_event
from runtime import metrics
from runtime.protocol import DeliveryError, Requester
from storage.abc import JSON, ConversationRecord, InboxEvent, JobRecord
from storage.memory import MemoryStore
from tests.storage.jobs import add_job

KEY = "emulator:c1"
REFERENCE = {"conversation": {"id": "c1"}, "serviceUrl": "http://127.0.0.1:9/"}


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[JSON] = []
        self.failures: list[DeliveryError] = []

    async def send(self, reference: JSON, activity: JSON) -> str | None:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(activity)
        return str(len(self.sent))

    async def typing(self, reference: JSON) -> None:
        return None

    @property
    def texts(self) -> list[str]:
        return [a["text"] for a in self.sent]


class UnreachableModel(OfflineChatCompletionClient):
    async def create(self, messages: Sequence[LLMMessage], **kwargs: Any) -> CreateResult:
        raise ConnectionError("model endpoint unreachable")


def processor(store: MemoryStore, sender: FakeSender, model: OfflineChatCompletionClient | None = None
              ) -> ConversationProcessor:
    runner = AgentTurnRunner(model or OfflineChatCompletionClient(), lambda scope: [])
    return ConversationProcessor(store, runner, sender, welcome=lambda: text_activity("welcome"), max_backoff=0.05)


async def message(store: MemoryStore, event_id: str, text: str) -> None:
    await store.save_reference(KEY, REFERENCE)
    await store.append_event(KEY, InboxEvent(id=event_id, kind="message", payload={"text": text}))


async def test_an_unreachable_model_gets_a_clear_message_and_keeps_the_state() -> None:
    store, sender = MemoryStore(), FakeSender()
    await message(store, "m1", "my name is Ada")
    ok = processor(store, sender)
    ok.wake(KEY)
    await ok.idle()
    before = (await store.load(KEY)).agent_state

    await message(store, "m2", "what is my name?")
    failing = processor(store, sender, UnreachableModel())
    failing.wake(KEY)
    await failing.idle()
    assert "couldn't get an answer from the model" in sender.texts[-1]
    assert (await store.load(KEY)).agent_state == before
    assert await store.pending_events(KEY) == []


async def test_a_concurrent_commit_makes_the_turn_redo_not_overwrite() -> None:
    store, sender = MemoryStore(), FakeSender()
    await message(store, "m1", "my name is Ada")
    original_commit = store.commit
    raced = False

    async def racing_commit(record: ConversationRecord, **kwargs: Any) -> ConversationRecord:
        nonlocal raced
        if not raced:  # another writer moves first, once
            raced = True
            await original_commit(await store.load(KEY), processed=[])
        return await original_commit(record, **kwargs)

    store.commit = racing_commit  # type: ignore[method-assign]
    p = processor(store, sender)
    p.wake(KEY)
    await p.idle()
    assert sender.texts == ["Nice to meet you, Ada. I'll remember that."]
    assert (await store.load(KEY)).turns == 1


async def test_transient_delivery_failure_keeps_the_message_until_it_is_sent() -> None:
    store, sender = MemoryStore(), FakeSender()
    sender.failures = [DeliveryError("503", permanent=False, retry_after=0.05)] * 2
    await message(store, "m1", "my name is Ada")
    p = processor(store, sender)
    p.wake(KEY)
    await asyncio.wait_for(p.idle(), 5)
    assert sender.texts == ["Nice to meet you, Ada. I'll remember that."]
    assert (await store.load(KEY)).outbox == ()


async def test_permanent_delivery_failure_drops_the_message() -> None:
    store, sender = MemoryStore(), FakeSender()
    sender.failures = [DeliveryError("403 bot removed", permanent=True)]
    await message(store, "m1", "hello")
    p = processor(store, sender)
    p.wake(KEY)
    await p.idle()
    assert sender.sent == [] and (await store.load(KEY)).outbox == ()
    assert await store.conversations_with_work() == []


@pytest.mark.parametrize("kind", ["welcome", "reset"])
async def test_welcome_and_reset_events_need_no_model(kind: str) -> None:
    store, sender = MemoryStore(), FakeSender()
    await store.save_reference(KEY, REFERENCE)
    await store.append_event(KEY, InboxEvent(id=kind, kind=kind, payload={}))
    p = processor(store, sender, UnreachableModel())
    p.wake(KEY)
    await p.idle()
    assert len(sender.sent) == 1 and "couldn't" not in sender.texts[0]


async def test_a_job_result_is_told_plainly_when_the_model_is_down() -> None:
    store, sender = MemoryStore(), FakeSender()
    await store.save_reference(KEY, REFERENCE)
    payload = {"job_id": "j1", "call_id": "c1", "tool": "activate_new_line", "status": "succeeded",
               "content": '{"message": "Line 555-0100 is active."}', "is_error": False, "arguments": {}}
    await store.append_event(KEY, InboxEvent(id="job:j1", kind="job_finished", payload=payload))
    p = processor(store, sender, UnreachableModel())
    p.wake(KEY)
    await p.idle()
    assert sender.texts[-1] == "Background job `j1` (`activate_new_line`) succeeded: Line 555-0100 is active."


async def test_an_unreadable_stored_state_fails_the_turn_not_the_processor() -> None:
    store, sender = MemoryStore(), FakeSender()
    record = await store.commit(ConversationRecord(key=KEY, agent_state={"type": "TeamState", "agent_states": 7}))
    await message(store, "m1", "hello")
    p = processor(store, sender)
    p.wake(KEY)
    await asyncio.wait_for(p.idle(), 5)
    assert len(sender.texts) == 1 and sender.texts[0].startswith("Sorry")
    assert (await store.load(KEY)).agent_state == record.agent_state
    assert await store.pending_events(KEY) == []


# --- issue 16: a decided approval ---


async def test_an_approval_is_told_by_the_agent_and_a_decided_job_is_scheduled_after_the_commit() -> None:
    store, sender = MemoryStore(), FakeSender()
    ada = Requester(id="user-1", name="Ada").to_json()
    scheduled: list[tuple[str, int]] = []
    await store.save_reference(KEY, REFERENCE)
    for job_id, choice in (("yes", "approved"), ("no", "rejected")):
        job = JobRecord(id=job_id, conversation_key=KEY, tool="activate_new_line", arguments={}, status="queued",
                        started_by=ada, approval={"expires_at": 0, "decision": choice, "by": ada, "at": 1.0})
        await add_job(store, job)
        await store.append_event(KEY, approval_event(job))

    async def schedule(job: JobRecord) -> None:
        scheduled.append((job.id, len((await store.load(KEY)).outbox)))  # what was committed by then

    runner = AgentTurnRunner(OfflineChatCompletionClient(), lambda scope: [])
    proc = ConversationProcessor(store, runner, sender, welcome=lambda: text_activity("welcome"),
                                 schedule_job=schedule)
    proc.wake(KEY)
    await proc.idle()
    assert [job_id for job_id, _ in scheduled] == ["yes", "no"] and scheduled[0][1] >= 1  # after the commit
    # The approval is relayed; the rejection waits for the runner's job:<id> result (no turn of its own).
    assert sender.texts == ["Job `yes` (activate new line) was approved by Ada and is starting now; its result will "
                            "follow when it finishes."]
    assert await store.pending_events(KEY) == []


class Lease:
    """Issue 18: a worker's hold on the conversation, with a clock the test moves (cluster.Ownership)."""

    def __init__(self, epoch: int, deadline: float) -> None:
        self.clock = 0.0
        self.ownership = Ownership(1, clock=lambda: self.clock)
        self.ownership.grant(0, epoch, deadline)


async def test_a_worker_whose_lease_ran_out_during_a_turn_commits_and_sends_nothing() -> None:
    """Frozen mid-turn past its lease (the clock jumps, as CLOCK_MONOTONIC does over a SIGSTOP)."""
    store, sender = MemoryStore(), FakeSender()
    await message(store, "m1", "my name is Ada")
    lease = Lease(epoch=3, deadline=10.0)
    runner = AgentTurnRunner(OfflineChatCompletionClient(), lambda scope: [])
    original_run = runner.run

    async def frozen_during_the_turn(*args: Any, **kwargs: Any) -> Any:
        outcome = await original_run(*args, **kwargs)
        lease.clock = 20.0
        return outcome

    runner.run = frozen_during_the_turn  # type: ignore[method-assign]
    before = metrics.FENCED_WRITES.labels("lease")._value.get()
    p = ConversationProcessor(store, runner, sender, welcome=lambda: text_activity("welcome"),
                              owner=lease.ownership)
    p.wake(KEY)
    await p.idle()
    assert sender.sent == [] and (await store.load(KEY)).etag is None
    assert [e.id for e in await store.pending_events(KEY)] == ["m1"]  # left for the new owner
    assert metrics.FENCED_WRITES.labels("lease")._value.get() == before + 1
    p.wake(KEY)  # and it no longer takes the conversation up at all
    await p.idle()
    assert sender.sent == []


async def test_a_late_commit_under_an_older_epoch_is_refused_by_the_store() -> None:
    store, sender = MemoryStore(), FakeSender()
    await message(store, "m1", "my name is Ada")
    newer = Lease(epoch=9, deadline=100.0)
    await store.commit(ConversationRecord(key=KEY), fence=9)  # the new owner wrote the conversation
    older = Lease(epoch=4, deadline=100.0)  # its own clock has not noticed yet
    before = metrics.FENCED_WRITES.labels("store")._value.get()
    p = ConversationProcessor(store, AgentTurnRunner(OfflineChatCompletionClient(), lambda scope: []), sender,
                              welcome=lambda: text_activity("welcome"), owner=older.ownership)
    p.wake(KEY)
    await p.idle()
    assert sender.sent == [] and (await store.load(KEY)).fence == 9
    assert metrics.FENCED_WRITES.labels("store")._value.get() == before + 1
    q = ConversationProcessor(store, AgentTurnRunner(OfflineChatCompletionClient(), lambda scope: []), sender,
                              welcome=lambda: text_activity("welcome"), owner=newer.ownership)
    q.wake(KEY)
    await q.idle()
    assert sender.texts == ["Nice to meet you, Ada. I'll remember that."]
