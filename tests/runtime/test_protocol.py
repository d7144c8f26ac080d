"""The protocol's vocabulary: stored strings stay what earlier versions wrote, JSON forms round-trip."""

from __future__ import annotations

import json

import pytest

from jobs.runner import finished_event, job_from_finished_event
from runtime import protocol
from runtime.protocol import EventKind, JobResult, Requester
from storage.abc import InboxEvent, JobRecord
from storage.memory import MemoryStore

RESULT = JobResult(job_id="0d73272971a7", call_id="call_1", tool="activate_new_line", status="succeeded",
                   content='{"message": "Line 555-0100 is active."}', is_error=False,
                   arguments={"phone_number": "555-0100"})


def test_event_kinds_are_the_stored_strings() -> None:
    assert [k.value for k in EventKind] == ["message", "command", "welcome", "reset", "job_finished",
                                             "approval"]
    assert EventKind("job_finished") is EventKind.JOB_FINISHED
    assert EventKind.MESSAGE == "message" and json.dumps(EventKind.RESET) == '"reset"'
    assert "job_finished" in protocol.AGENT_KINDS and "welcome" not in protocol.AGENT_KINDS


def test_id_conventions() -> None:
    assert protocol.finished_event_id("abc") == "job:abc"
    assert protocol.approval_event_id("abc") == "approval:abc"
    assert protocol.message_event_id("1:xyz") == "1:xyz"
    assert protocol.message_event_id(None).startswith("noid-") and protocol.message_event_id("") != "noid-"
    assert protocol.message_event_id(None) != protocol.message_event_id(None)
    assert protocol.reset_event_id("1:xyz") == "reset:1:xyz"
    assert protocol.reset_event_id(None).startswith("reset:") and len(protocol.reset_event_id(None)) > 6
    assert protocol.WELCOME_EVENT_ID == "welcome"
    thread = "19:a@thread.tacv2;messageid=1"
    assert protocol.conversation_key("msteams", thread) == f"msteams:{thread}"


def test_outbox_ids() -> None:
    reply = protocol.reply_id("reset:1:xyz", 0)
    assert reply == "reset:1:xyz#0" and protocol.reply_id("m1", "too-large") == "m1#too-large"
    assert protocol.replied_event_id(reply) == "reset:1:xyz" and protocol.is_reset_reply(reply)
    assert not protocol.is_reset_reply(protocol.reply_id("m1", 0))
    card = protocol.card_message_id("0d73272971a7")
    assert card == "card:0d73272971a7" and protocol.card_job_id(card) == "0d73272971a7"
    assert protocol.card_job_id(reply) is None and protocol.replied_event_id(card) is None


def test_job_result_round_trips_through_json() -> None:
    data = json.loads(json.dumps(RESULT.to_json()))
    assert JobResult.from_json(data) == RESULT
    # The payload earlier versions stored (the dataclass's __dict__) has the same keys.
    assert set(data) == {"job_id", "call_id", "tool", "status", "content", "is_error", "arguments"}
    minimal = {k: v for k, v in data.items() if k not in ("call_id", "arguments")}
    assert JobResult.from_json(minimal) == JobResult(**{**RESULT.__dict__, "call_id": None, "arguments": {}})


@pytest.mark.parametrize("bad", [None, [], "text", {"job_id": "x"}, {**RESULT.to_json(), "arguments": 3}])
def test_a_malformed_job_result_is_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError):
        JobResult.from_json(bad)


def test_requester_round_trips_and_reads_old_payloads() -> None:
    ada = Requester(id="29:ada", name="Ada", aad_object_id="aad-1", tenant_id="t1", conversation_type="groupChat")
    assert Requester.from_json(json.loads(json.dumps(ada.to_json()))) == ada
    assert Requester.from_json({"id": "29:ada", "name": "Ada"}) == Requester(id="29:ada", name="Ada")
    assert Requester.from_json("nobody") == Requester()


async def test_a_finished_event_stored_by_an_earlier_version_still_loads() -> None:
    """Earlier versions stored ``JobResult.__dict__`` under the kind string: the job is restored from it."""
    job = JobRecord(id=RESULT.job_id, conversation_key="msteams:c1", tool=RESULT.tool, arguments=RESULT.arguments,
                    call_id=RESULT.call_id)
    store = MemoryStore()
    old = InboxEvent(id=f"job:{job.id}", kind="job_finished", payload=dict(RESULT.__dict__))
    await store.append_event(job.conversation_key, old)
    loaded = await store.get_event(job.conversation_key, protocol.finished_event_id(job.id))
    assert loaded is not None and loaded.kind == EventKind.JOB_FINISHED
    restored = job_from_finished_event(job, loaded)
    assert restored.status == "succeeded" and restored.result == {"message": "Line 555-0100 is active."}
    new = finished_event(restored)
    assert (new.id, new.kind, new.payload) == (old.id, old.kind, old.payload)
