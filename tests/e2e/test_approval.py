"""Durable human approval (issue 16), end to end on the real app and the recording Bot Connector.

``APPROVAL_REQUIRED_TOOLS=activate_new_line`` puts the demo tool behind approval with no code and,
with the offline model, no credentials. The tests that can share one app process do (``approval_bot``);
the expiry and the crash tests start their own.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness.activities import message
from harness.botproc import BotProcess, HttpEndpoint
from harness.cluster import BotCluster
from harness.connector import Recorded, RecordingConnector
from storage.abc import ConversationStore
from tests.e2e.conftest import Launch, StoreProbe
from tests.e2e.test_conversation import say
from tests.e2e.test_job_cards import card_in, facts, invoke, post_invoke

pytestmark = pytest.mark.e2e

APPROVER = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"  # an AAD object id in APPROVERS
ENV = {"APPROVAL_REQUIRED_TOOLS": "activate_new_line", "APPROVERS": APPROVER, "ACTIVATE_LINE_SECONDS": "1"}
JOB_ID = re.compile(r"job `([0-9a-f]{12})`")
ASKED = "needs a person's approval"


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    """The claim is covered on every store by tests/storage/test_contract.py; the flow once here."""
    return str(request.param)


@pytest.fixture(scope="module")
def approval_bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    bot = BotProcess(tmp_path_factory.mktemp("approval"), env=ENV)
    bot.start()
    yield bot
    bot.kill()


# --------------------------------------------------------------------------------- helpers


def approval_cards(conn: RecordingConnector, conv: str) -> list[Recorded]:
    return [e for e in conn.delivered(conv) if e.method == "POST"
            and "Approval needed" in json.dumps((card_in(e.activity) or {}).get("body", [])[:1])]


def ask(bot: HttpEndpoint, conn: RecordingConnector, conv: str, number: str, **kwargs: Any) -> tuple[str, Recorded]:
    """The user asks for an activation: the bot's answer says it awaits approval; the approval card."""
    say(bot, conn, conv, f"activate line {number}", **kwargs)
    conn.wait_for(lambda c: any(ASKED in t for t in c.texts(conv)) and bool(approval_cards(c, conv)), timeout=10)
    [text] = [t for t in conn.texts(conv) if ASKED in t]
    match = JOB_ID.search(text)
    assert match, text
    [card] = approval_cards(conn, conv)
    return match.group(1), card


def click(bot: HttpEndpoint, conn: RecordingConnector, conv: str, card: Recorded, verb: str, job_id: str,
          **who: Any) -> tuple[int, Any]:
    activity = invoke(conn, conv, card.response_id or "", {"type": "Action.Execute", "verb": verb,
                                                           "data": {"action": verb, "jobId": job_id}})
    activity["from"].update(who)
    status, body = bot.post_activity(activity)
    return status, json.loads(body) if body else None


def shown_card(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict) and body.get("type") == "application/vnd.microsoft.card.adaptive", body
    card = body["value"]
    assert isinstance(card, dict)
    return card


def card_text(card: dict[str, Any]) -> str:
    return json.dumps(card, ensure_ascii=False)


def completions(conn: RecordingConnector, conv: str) -> list[str]:
    return [t for t in conn.texts(conv) if "is active" in t]


def job(stored: StoreProbe, conv: str, job_id: str) -> dict[str, Any]:
    return next(j for j in stored.jobs(f"emulator:{conv}") if j["id"] == job_id)


def wait_until_sent(stored: StoreProbe, conv: str, timeout: float = 10) -> None:
    """Until the conversation's outbox is empty: a kill between a send and its removal from the outbox
    repeats that one message (the documented at-most-one), which is not what these tests are about."""
    async def unsent(store: ConversationStore) -> int:
        return len((await store.load(f"emulator:{conv}")).outbox)

    deadline = time.monotonic() + timeout
    while stored.run(unsent):
        assert time.monotonic() < deadline, "the outbox was not flushed"
        time.sleep(0.05)


def probe(bot: BotProcess) -> StoreProbe:
    return StoreProbe(bot.data_dir, {})


# ------------------------------------------------------------------------------------ tests


def test_approve_runs_the_job_once_and_the_card_shows_who_decided(approval_bot: BotProcess, conn: RecordingConnector,
                                                                  conv: str) -> None:
    job_id, card = ask(approval_bot, conn, conv, "555-0101")
    posted = card_in(card.activity)
    assert posted is not None
    assert [(a["type"], a["verb"], a["title"], a["fallback"]["type"]) for a in posted["actions"]] == [
        ("Action.Execute", "approveJob", "Approve", "Action.Submit"),
        ("Action.Execute", "rejectJob", "Reject", "Action.Submit")]
    assert {"Job": job_id, "Phone number": "555-0101", "Asked by": "Ada"}.items() <= facts(posted).items()
    assert job(probe(approval_bot), conv, job_id)["status"] == "awaiting_approval"  # nothing runs yet

    status, body = click(approval_bot, conn, conv, card, "approveJob", job_id)
    assert status == 200, body
    answered = shown_card(body)  # the clicker's copy: the job card with the decision
    assert "Approved by Ada" in facts(answered)["Approval"] and "actions" in answered  # Cancel while it runs
    # Everyone's copy is updated in place, then the job runs and the agent says what happens next.
    conn.wait_for(lambda c: any("Approved by Ada" in card_text(card_in(u.activity) or {})
                                for u in c.updates(conv) if u.activity_id == card.response_id), timeout=10)
    conn.wait_for(lambda c: len(completions(c, conv)) == 1, timeout=15)
    texts = conn.texts(conv)
    assert len([t for t in texts if "was approved by Ada and is starting now" in t]) == 1, texts
    stored = job(probe(approval_bot), conv, job_id)
    assert (stored["status"], stored["attempt"]) == ("succeeded", 1)
    assert len(approval_cards(conn, conv)) == 1  # one card, updated in place


def test_reject_never_runs_the_tool_and_the_model_is_told_who(approval_bot: BotProcess, conn: RecordingConnector,
                                                              conv: str) -> None:
    job_id, card = ask(approval_bot, conn, conv, "555-0102")
    status, body = click(approval_bot, conn, conv, card, "rejectJob", job_id)
    assert status == 200, body
    answered = shown_card(body)
    assert "Rejected by Ada" in facts(answered)["Approval"] and "Rejected" in answered["body"][1]["text"]
    assert "actions" not in answered  # no Cancel on a request that will not run
    conn.wait_for(lambda c: any("rejected by Ada" in t for t in c.texts(conv)), timeout=10)
    stored = job(probe(approval_bot), conv, job_id)
    assert (stored["status"], stored["attempt"], stored["started_at"]) == ("rejected", 0, None)
    assert not completions(conn, conv)
    # A second click is told it was decided; nothing changes.
    status, body = click(approval_bot, conn, conv, card, "approveJob", job_id)
    assert status == 200 and "decided already" in card_text(shown_card(body))
    assert job(probe(approval_bot), conv, job_id)["status"] == "rejected"


def test_in_a_group_chat_only_the_requester_or_an_approver_may_decide(approval_bot: BotProcess,
                                                                      conn: RecordingConnector, conv: str) -> None:
    group = {"conversation_type": "groupChat"}
    job_id, card = ask(approval_bot, conn, conv, "555-0103", **group)

    def group_click(verb: str, **who: Any) -> tuple[int, Any]:
        activity = invoke(conn, conv, card.response_id or "", {"type": "Action.Execute", "verb": verb,
                                                               "data": {"action": verb, "jobId": job_id}})
        activity["conversation"].update(conversationType="groupChat", isGroup=True)
        activity["from"].update(who)
        return post_invoke(approval_bot, activity)

    status, body = group_click("approveJob", id="user-2", name="Mallory")
    assert status == 200, body
    refused = shown_card(body)
    assert "Only Ada or an approver can approve or reject" in card_text(refused)
    assert [a["title"] for a in refused["actions"]] == ["Approve", "Reject"]  # still open
    assert job(probe(approval_bot), conv, job_id)["status"] == "awaiting_approval"
    status, body = group_click("approveJob", id="user-3", name="Grace", aadObjectId=APPROVER.upper())
    assert status == 200 and "Approved by Grace" in facts(shown_card(body))["Approval"], body
    conn.wait_for(lambda c: len(completions(c, conv)) == 1, timeout=15)


def test_a_double_approve_and_a_redelivered_invoke_run_the_job_once(approval_bot: BotProcess,
                                                                     conn: RecordingConnector, conv: str) -> None:
    job_id, card = ask(approval_bot, conn, conv, "555-0104")
    activities = [invoke(conn, conv, card.response_id or "", {"type": "Action.Execute", "verb": "approveJob",
                                                              "data": {"action": "approveJob", "jobId": job_id}})
                  for _ in range(3)]
    activities.append(dict(activities[0]))  # the channel redelivers the first invoke
    answers: list[tuple[int, Any]] = []
    threads = [threading.Thread(target=lambda a=a: answers.append(post_invoke(approval_bot, a))) for a in activities]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in answers] == [200] * 4, answers
    won = [b for _, b in answers if "decided already" not in card_text(shown_card(b))]
    assert len(won) == 1, answers
    conn.wait_for(lambda c: len(completions(c, conv)) == 1, timeout=15)
    time.sleep(1.0)  # a second run would announce within the activation's second
    assert len(completions(conn, conv)) == 1
    assert len([t for t in conn.texts(conv) if "is starting now" in t]) == 1, conn.texts(conv)
    assert job(probe(approval_bot), conv, job_id)["attempt"] == 1


def test_jobs_shows_the_request_and_cancel_withdraws_it(approval_bot: BotProcess, conn: RecordingConnector,
                                                        conv: str) -> None:
    job_id, card = ask(approval_bot, conn, conv, "555-0105")
    say(approval_bot, conn, conv, "jobs")  # the jobs card (a command, no model)
    def listed(c: RecordingConnector) -> bool:
        cards = [card_text(card_in(a) or {}) for a in c.activities(conversation_id=conv)]
        return any("Background jobs" in t and job_id in t and "Awaiting approval" in t for t in cards)

    conn.wait_for(listed, timeout=10)
    say(approval_bot, conn, conv, "status")  # the model's job tool: get_job_status
    conn.wait_for(lambda c: any(f"Job `{job_id}`" in t and "awaiting_approval" in t for t in c.texts(conv)),
                  timeout=10)
    say(approval_bot, conn, conv, f"cancel {job_id}")
    conn.wait_for(lambda c: any("cancelled while it awaited approval" in t for t in c.texts(conv)), timeout=10)
    assert job(probe(approval_bot), conv, job_id)["status"] == "cancelled"
    conn.wait_for(lambda c: any("Cancelled" in card_text(card_in(u.activity) or {})
                                for u in c.updates(conv) if u.activity_id == card.response_id), timeout=10)


def test_the_action_submit_fallback_decides_too(approval_bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    job_id, _ = ask(approval_bot, conn, conv, "555-0106")
    click = message("", conversation_id=conv, service_url=conn.url)
    click.pop("text")
    click["value"] = {"action": "rejectJob", "jobId": job_id}
    status, body = approval_bot.post_activity(click)
    assert status in (200, 201), body
    conn.wait_for(lambda c: any(t.startswith("Rejected by Ada") for t in c.texts(conv)), timeout=10)
    conn.wait_for(lambda c: any("rejected by Ada" in t and "was not run" in t for t in c.texts(conv)), timeout=10)
    assert job(probe(approval_bot), conv, job_id)["status"] == "rejected"


def test_bad_clicks_get_clear_answers_and_change_nothing(approval_bot: BotProcess, conn: RecordingConnector,
                                                         conv: str) -> None:
    job_id, card = ask(approval_bot, conn, conv, "555-0111")
    no_id = invoke(conn, conv, card.response_id or "", {"type": "Action.Execute", "verb": "approveJob", "data": {}})
    status, body = post_invoke(approval_bot, no_id)
    assert 400 <= body.get("statusCode", status) < 500 and body["type"] == "application/vnd.microsoft.error", body
    status, body = click(approval_bot, conn, conv, card, "approveJob", "0123456789ab")
    assert status == 200 and "There is no job `0123456789ab`" in card_text(shown_card(body))
    assert job(probe(approval_bot), conv, job_id)["status"] == "awaiting_approval"


# --------------------------------------------------------------- their own process: expiry, crashes


def test_an_unanswered_request_expires_and_the_agent_is_told(launch: Launch, conn: RecordingConnector, conv: str,
                                                              stored: StoreProbe) -> None:
    bot = launch({**ENV, "APPROVAL_TIMEOUT_HOURS": "0.0005"})  # 1.8 s
    assert isinstance(bot, BotProcess)
    job_id, card = ask(bot, conn, conv, "555-0107")
    conn.wait_for(lambda c: any("approval request expired" in t for t in c.texts(conv)), timeout=15)
    conn.wait_for(lambda c: any("Expired" in card_text(card_in(u.activity) or {})
                                for u in c.updates(conv) if u.activity_id == card.response_id), timeout=10)
    assert job(stored, conv, job_id)["status"] == "expired"
    status, body = click(bot, conn, conv, card, "approveJob", job_id)  # too late
    assert status == 200 and "decided already" in card_text(shown_card(body))
    assert not completions(conn, conv)


def test_sigkill_while_pending_then_approve_after_the_restart_runs_once(launch: Launch, conn: RecordingConnector,
                                                                        conv: str, stored: StoreProbe) -> None:
    bot = launch(ENV)
    assert isinstance(bot, BotProcess)
    job_id, card = ask(bot, conn, conv, "555-0108")
    wait_until_sent(stored, conv)  # the request is pending and all of it is out: now the process dies
    bot.kill()
    bot.start()
    status, body = click(bot, conn, conv, card, "approveJob", job_id)
    assert status == 200 and "Approved by Ada" in facts(shown_card(body))["Approval"], body
    conn.wait_for(lambda c: len(completions(c, conv)) == 1, timeout=15)
    time.sleep(1.0)
    assert len(completions(conn, conv)) == 1, conn.texts(conv)
    assert len([t for t in conn.texts(conv) if ASKED in t]) == 1 and len(approval_cards(conn, conv)) == 1
    assert (job(stored, conv, job_id)["status"], job(stored, conv, job_id)["attempt"]) == ("succeeded", 1)


def test_sigkill_between_the_claim_and_its_event_loses_nothing(launch: Launch, conn: RecordingConnector,
                                                               conv: str, stored: StoreProbe) -> None:
    """The window the claim opens: the job is decided in the store, its approval event not yet appended."""
    bot = launch({**ENV, "CRASH_AT": "approval_claimed"})
    assert isinstance(bot, BotProcess)
    job_id, card = ask(bot, conn, conv, "555-0109")
    with contextlib.suppress(OSError):  # the process dies under the request
        click(bot, conn, conv, card, "approveJob", job_id)
    bot.wait_exited(10)
    assert not bot.alive and "crash point 'approval_claimed'" in bot.log_tail()
    assert job(stored, conv, job_id)["status"] == "queued"  # claimed, and nothing told anyone
    bot.extra_env.pop("CRASH_AT")
    bot.start()
    conn.wait_for(lambda c: len(completions(c, conv)) == 1, timeout=15)
    conn.wait_for(lambda c: any("is starting now" in t for t in c.texts(conv)), timeout=10)
    time.sleep(1.0)
    assert len(completions(conn, conv)) == 1
    assert len([t for t in conn.texts(conv) if "is starting now" in t]) == 1, conn.texts(conv)
    assert job(stored, conv, job_id)["attempt"] == 1



class TestOnACluster:
    """2 web + 2 worker processes on Cosmos DB and PostgreSQL (harness/cluster.py): the click lands on a
    web process, the job runs on whichever worker is active, the expiry timer is in the shared job store."""

    @pytest.fixture
    def backend(self) -> str:
        return "cluster"

    def test_a_request_outlives_the_active_worker_and_is_approved_through_a_web_process(
            self, launch: Launch, conn: RecordingConnector, conv: str, stored: StoreProbe) -> None:
        cluster = launch(ENV)
        assert isinstance(cluster, BotCluster)
        job_id, card = ask(cluster, conn, conv, "555-0110")
        key = f"emulator:{conv}"
        active = cluster.owner(key)
        active.kill()  # the worker that armed the expiry timer dies while the request waits
        assert cluster.owner(key, timeout=15, besides=active) is not active
        status, body = click(cluster, conn, conv, card, "approveJob", job_id)
        assert status == 200 and "Approved by Ada" in facts(shown_card(body))["Approval"], body
        conn.wait_for(lambda c: len(completions(c, conv)) == 1, timeout=20)
        time.sleep(1.0)
        assert len(completions(conn, conv)) == 1, conn.texts(conv)
        assert len([t for t in conn.texts(conv) if "is starting now" in t]) == 1, conn.texts(conv)
        assert (job(stored, conv, job_id)["status"], job(stored, conv, job_id)["attempt"]) == ("succeeded", 1)
