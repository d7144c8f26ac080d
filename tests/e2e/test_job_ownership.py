"""Who started a job, who may cancel it, and how many may run (findings 7 and 9), on the real app.

A group chat with two members, Ada and Bob (different AAD object ids): Bob cannot cancel Ada's
job by text, by the card's Action.Execute button or by its Action.Submit fallback, nor by asking
the agent, and does not see its arguments in the jobs list; Ada and an admin can cancel it.
Active jobs are capped per conversation and per user; a refused start records nothing.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from harness.activities import message, new_conversation_id
from harness.botproc import HttpEndpoint
from harness.connector import RecordingConnector
from tests.e2e.conftest import Launch, StoreProbe
from tests.e2e.test_job_cards import cancel_data, card_in, execute_cancel, facts, post_invoke, wait_for_card

pytestmark = pytest.mark.e2e

ADA = {"id": "29:ada", "name": "Ada", "aadObjectId": "aad-ada"}
BOB = {"id": "29:bob", "name": "Bob", "aadObjectId": "aad-bob"}
ROOT = {"id": "29:root", "name": "Root", "aadObjectId": "aad-root"}
JOB_ID = re.compile(r"job `([0-9a-f]{12})`")


def from_user(activity: dict[str, Any], user: dict[str, str]) -> dict[str, Any]:
    activity["from"] = dict(user)
    return activity


def group_message(conn: RecordingConnector, conv: str, text: str, user: dict[str, str],
                  conversation_type: str = "groupChat", **kwargs: Any) -> dict[str, Any]:
    return from_user(message(text, conversation_id=conv, service_url=conn.url, conversation_type=conversation_type,
                             **kwargs), user)


def say_as(bot: HttpEndpoint, conn: RecordingConnector, conv: str, text: str, user: dict[str, str],
           conversation_type: str = "groupChat") -> None:
    status, body = bot.post_activity(group_message(conn, conv, text, user, conversation_type))
    assert status == 201, body


def click_cancel(bot: HttpEndpoint, conn: RecordingConnector, conv: str, card_id: str, job_id: str,
                 user: dict[str, str]) -> dict[str, Any]:
    """Action.Execute on the card's Cancel button, pressed by ``user``: the invoke's answer."""
    activity = group_message(conn, conv, "", user, reply_to_id=card_id)
    for name in ("text", "textFormat"):
        activity.pop(name)
    activity.update(type="invoke", name="adaptiveCard/action", value={"action": execute_cancel(job_id),
                                                                       "trigger": "manual"})
    status, body = post_invoke(bot, activity)  # type: ignore[arg-type]
    assert status == 200 and isinstance(body, dict) and body.get("statusCode") == 200, (status, body)
    return dict(body["value"])


def submit_cancel(bot: HttpEndpoint, conn: RecordingConnector, conv: str, card_id: str, job_id: str,
                  user: dict[str, str]) -> None:
    """The Action.Submit fallback of the Cancel button, pressed by ``user``."""
    activity = group_message(conn, conv, "", user, reply_to_id=card_id)
    activity.pop("text")
    activity["value"] = cancel_data(job_id)
    status, body = bot.post_activity(activity)
    assert status in (200, 201), body


def card_texts(card: dict[str, Any]) -> str:
    return json.dumps(card)


def jobs_list_cards(conn: RecordingConnector, conv: str) -> list[dict[str, Any]]:
    cards = [card_in(m) for m in conn.messages(conv)]
    return [c for c in cards if c and "Background jobs" in json.dumps(c)]


@pytest.fixture
def bot_env() -> dict[str, str]:
    return {"ACTIVATE_LINE_SECONDS": "120", "ADMINS": "AAD-ROOT"}


def test_in_a_group_chat_only_the_starter_or_an_admin_cancels_a_job(bot: HttpEndpoint, conn: RecordingConnector,
                                                                    conv: str, stored: StoreProbe) -> None:
    key = f"emulator:{conv}"
    say_as(bot, conn, conv, "activate line 555-0100", ADA)
    post, job_id = wait_for_card(conn, conv, timeout=15)
    card = card_in(post.activity)
    assert card is not None and facts(card)["Started by"] == "Ada"
    assert post.response_id is not None
    [job] = stored.jobs(key)
    assert job["started_by"] == {"id": "29:ada", "name": "Ada", "aadObjectId": "aad-ada", "tenantId": "",
                                 "conversationType": "groupChat"}

    # Bob, by text, by the card's button (invoke), by its Action.Submit fallback, by asking the agent.
    say_as(bot, conn, conv, f"cancel {job_id}", BOB)
    refusal = f"Only Ada, who started job `{job_id}`, or a bot admin can cancel it. Nothing was changed."
    conn.wait_for(lambda c: refusal in c.texts(conv), timeout=10)
    answer = click_cancel(bot, conn, conv, post.response_id, job_id, BOB)
    assert refusal in card_texts(answer) and facts(answer)["Job"] == job_id and answer.get("actions"), answer
    submit_cancel(bot, conn, conv, post.response_id, job_id, BOB)
    conn.wait_for(lambda c: c.texts(conv).count(refusal) == 2, timeout=10)
    say_as(bot, conn, conv, f"stop job {job_id}", BOB)  # the offline model's phrase: the cancel_job tool
    conn.wait_for(lambda c: c.texts(conv).count(refusal) == 3, timeout=15)
    [job] = stored.jobs(key)
    assert (job["status"], job["cancel_requested"]) == ("running", False)

    # What Bob sees of Ada's job: that it exists, its state and who started it, not its arguments.
    say_as(bot, conn, conv, "jobs", BOB)
    conn.wait_for(lambda c: len(jobs_list_cards(c, conv)) == 1, timeout=10)
    listing = card_texts(jobs_list_cards(conn, conv)[0])
    assert job_id in listing and "started by Ada" in listing and "555-0100" not in listing, listing
    say_as(bot, conn, conv, "status", BOB)  # the agent's get_job_status tool
    conn.wait_for(lambda c: any(f"Job `{job_id}`" in t and "started by Ada" in t for t in c.texts(conv)), timeout=15)
    assert not any("555-0100" in t for t in conn.texts(conv) if "started by Ada" in t), conn.texts(conv)
    say_as(bot, conn, conv, "jobs", ADA)  # Ada sees her own job's arguments
    conn.wait_for(lambda c: len(jobs_list_cards(c, conv)) == 2, timeout=10)
    assert "555-0100" in card_texts(jobs_list_cards(conn, conv)[1])

    # Ada, from the card: cancelled.
    answer = click_cancel(bot, conn, conv, post.response_id, job_id, ADA)
    assert "Cancelling" in card_texts(answer) and "actions" not in answer, answer
    conn.wait_for(lambda c: any(f"`{job_id}`" in t and "was cancelled" in t for t in c.texts(conv)), timeout=15)

    # An admin cancels Ada's next job by text.
    say_as(bot, conn, conv, "activate line 555-0101", ADA)
    conn.wait_for(lambda c: any("555-0101" in t and "job `" in t for t in c.texts(conv)), timeout=15)
    second = next(j["id"] for j in stored.jobs(key) if j["arguments"] == {"phone_number": "555-0101"})
    say_as(bot, conn, conv, f"cancel {second}", ROOT)
    conn.wait_for(lambda c: f"Cancelling job `{second}`…" in c.texts(conv), timeout=10)
    conn.wait_for(lambda c: all(j["status"] == "cancelled" for j in stored.jobs(key)), timeout=15)


def test_a_personal_chat_is_unchanged(bot: HttpEndpoint, conn: RecordingConnector, conv: str,
                                      stored: StoreProbe) -> None:
    say_as(bot, conn, conv, "activate line 555-0100", ADA, conversation_type="personal")
    _, job_id = wait_for_card(conn, conv, timeout=15)
    say_as(bot, conn, conv, "jobs", ADA, conversation_type="personal")
    conn.wait_for(lambda c: len(jobs_list_cards(c, conv)) == 1, timeout=10)
    assert "555-0100" in card_texts(jobs_list_cards(conn, conv)[0])
    say_as(bot, conn, conv, f"cancel {job_id}", ADA, conversation_type="personal")
    conn.wait_for(lambda c: f"Cancelling job `{job_id}`…" in c.texts(conv), timeout=10)


def active_jobs(stored: StoreProbe, conv: str) -> list[dict[str, Any]]:
    return [j for j in stored.jobs(f"emulator:{conv}") if j["status"] in ("queued", "running")]


def refused_calls(bot: HttpEndpoint, reason: str) -> float:
    status, body = bot.get("/metrics")
    assert status == 200
    found = re.search(rf'^teams_agent_tool_calls_refused_total\{{reason="{reason}"\}} (\S+)$', body, re.M)
    return float(found.group(1)) if found else 0.0


def test_active_jobs_are_capped_per_conversation(launch: Launch, conn: RecordingConnector, conv: str,
                                                 stored: StoreProbe) -> None:
    bot = launch({"ACTIVATE_LINE_SECONDS": "120", "MAX_ACTIVE_JOBS_PER_CONVERSATION": "2"})
    # Sent at once: the turns may be folded into one commit, whose earlier jobs count too.
    for n in range(3):
        say_as(bot, conn, conv, f"activate line 555-010{n}", ADA if n % 2 == 0 else BOB)
    texts = conn.wait_for_texts(3, conv, timeout=20)
    [refusal] = [t for t in texts if "MAX_ACTIVE_JOBS_PER_CONVERSATION" in t]
    assert "already has 2 background jobs" in refusal and "Nothing was started" in refusal, refusal
    assert len(active_jobs(stored, conv)) == 2
    assert refused_calls(bot, "conversation_cap") == 1
    # A finished (here: cancelled) job makes room again.
    first = active_jobs(stored, conv)[0]
    say_as(bot, conn, conv, f"cancel {first['id']}", ADA if first["started_by"]["id"] == ADA["id"] else BOB)
    conn.wait_for(lambda c: len(active_jobs(stored, conv)) == 1, timeout=15)
    count = len(conn.texts(conv))
    say_as(bot, conn, conv, "activate line 555-0199", ADA)
    conn.wait_for(lambda c: any("I've started activating line 555-0199" in t for t in c.texts(conv)[count:]),
                  timeout=15)
    assert len(active_jobs(stored, conv)) == 2


def test_active_jobs_are_capped_per_user_across_conversations(launch: Launch, conn: RecordingConnector,
                                                              stored: StoreProbe) -> None:
    bot = launch({"ACTIVATE_LINE_SECONDS": "120", "MAX_ACTIVE_JOBS_PER_USER": "2"})
    one, other = new_conversation_id(), new_conversation_id()
    say_as(bot, conn, one, "activate line 555-0100", ADA)
    say_as(bot, conn, one, "activate line 555-0101", ADA)
    conn.wait_for_texts(2, one, timeout=20)
    say_as(bot, conn, other, "activate line 555-0102", ADA)
    [refusal] = conn.wait_for_texts(1, other, timeout=15)
    assert "You already have 2 background jobs" in refusal and "MAX_ACTIVE_JOBS_PER_USER" in refusal, refusal
    assert active_jobs(stored, other) == [] and len(active_jobs(stored, one)) == 2
    say_as(bot, conn, other, "activate line 555-0103", BOB)  # someone else may still start one
    conn.wait_for(lambda c: len(c.texts(other)) == 2, timeout=15)
    assert "I've started activating line 555-0103" in conn.texts(other)[1]
    assert refused_calls(bot, "user_cap") == 1
