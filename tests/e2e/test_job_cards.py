"""The live job card, end to end: posted once, updated in place, cancellable from the card.

Against the recording Bot Connector (what the bot sends, to the request, with timings) and
against Microsoft's Agents Playground (what a Teams-like client makes of it, in a personal
chat, a group chat and a team channel). ``ACTIVATE_LINE_SECONDS`` is 7 so the job goes
through several progress steps (one every 1.75 s) and the 2 s card throttle matters.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from harness.activities import message
from harness.botproc import BotProcess
from harness.connector import Recorded, RecordingConnector
from harness.playground import Playground, message_text, playground_available
from tests.e2e.conftest import StoreProbe
from tests.e2e.test_conversation import say

pytestmark = pytest.mark.e2e

CARD = "application/vnd.microsoft.card.adaptive"
TITLE = "Activate new line"
JOB_ID = re.compile(r"job `([0-9a-f]{12})`")
MIN_UPDATE_GAP = 1.9  # the bot promises one card update per 2 s per job; a little slack for timing
MAX_PER_SECOND = 7  # Teams: about 7 messages per second per conversation


@pytest.fixture
def bot_env() -> dict[str, str]:
    return {"ACTIVATE_LINE_SECONDS": "7"}


# --------------------------------------------------------------------------------- helpers


def card_in(activity: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Adaptive Card an activity (or a Playground message) carries, if any."""
    for attachment in (activity or {}).get("attachments") or []:
        if isinstance(attachment, dict) and attachment.get("contentType") == CARD:
            content = attachment.get("content")
            return content if isinstance(content, dict) else None
    return None


def is_job_card(card: dict[str, Any] | None) -> bool:
    return bool(card) and card["body"][0].get("text") == TITLE  # type: ignore[index]


def facts(card: dict[str, Any]) -> dict[str, str]:
    return {f["title"]: f["value"] for item in card["body"] if item.get("type") == "FactSet" for f in item["facts"]}


def headline(card: dict[str, Any] | None) -> str:
    """The status line under the title, e.g. "🔄 Running" ("" for no card)."""
    if not card or len(card.get("body") or []) < 2:
        return ""
    return str(card["body"][1].get("text", ""))


def cancel_data(job_id: str) -> dict[str, str]:
    return {"action": "cancelJob", "jobId": job_id}


def assert_cancel_action(card: dict[str, Any], job_id: str) -> None:
    [action] = card["actions"]
    assert action["type"] == "Action.Execute" and action["verb"] == "cancelJob", action
    assert action["title"] == "Cancel" and action["data"] == cancel_data(job_id), action
    fallback = action["fallback"]
    assert fallback["type"] == "Action.Submit" and fallback["data"] == cancel_data(job_id), action


def card_posts(conn: RecordingConnector, conv: str) -> list[Recorded]:
    """POSTs of a job card (not the jobs list)."""
    return [e for e in conn.delivered(conv) if e.method == "POST" and is_job_card(card_in(e.activity))]


def card_updates(conn: RecordingConnector, conv: str, activity_id: str) -> list[Recorded]:
    return [u for u in conn.updates(conv) if u.activity_id == activity_id]


def wait_for_card(conn: RecordingConnector, conv: str, timeout: float = 5.0) -> tuple[Recorded, str]:
    """The job card's POST and the job id it shows."""
    conn.wait_for(lambda c: len(card_posts(c, conv)) >= 1, timeout=timeout)
    post = card_posts(conn, conv)[0]
    card = card_in(post.activity)
    assert card is not None and post.response_id
    return post, facts(card)["Job"]


def wait_for_update(conn: RecordingConnector, conv: str, activity_id: str, status: str,
                    timeout: float = 15.0) -> Recorded:
    """The first update of the card whose headline shows ``status``."""
    def found() -> Recorded | None:
        return next((u for u in card_updates(conn, conv, activity_id) if status in headline(card_in(u.activity))),
                    None)

    try:
        conn.wait_for(lambda c: found() is not None, timeout=timeout)
    except AssertionError:
        seen = [headline(card_in(u.activity)) for u in card_updates(conn, conv, activity_id)]
        raise AssertionError(
            f"no update of card {activity_id} shows {status!r} within {timeout}s; updates: {seen}") from None
    update = found()
    assert update is not None
    return update


def max_in_any_second(times: list[float]) -> int:
    """The most events that fall in one sliding 1 s window."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def invoke(conn: RecordingConnector, conv: str, reply_to_id: str, action: dict[str, Any]) -> dict[str, Any]:
    """An ``adaptiveCard/action`` invoke, as Teams sends it when Action.Execute is pressed."""
    activity = message("", conversation_id=conv, service_url=conn.url, reply_to_id=reply_to_id)
    for name in ("text", "textFormat"):
        activity.pop(name)
    activity.update(type="invoke", name="adaptiveCard/action", value={"action": action, "trigger": "manual"})
    return activity


def execute_cancel(job_id: str, verb: str = "cancelJob") -> dict[str, Any]:
    return {"type": "Action.Execute", "title": "Cancel", "verb": verb, "data": cancel_data(job_id)}


def post_invoke(bot: BotProcess, activity: dict[str, Any]) -> tuple[int, Any]:
    status, body = bot.post_activity(activity)
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body


# ------------------------------------------------------------ against the recording Connector


def test_the_card_is_posted_once_and_updated_in_place_until_it_succeeds(
        bot: BotProcess, conn: RecordingConnector, conv: str, stored: StoreProbe) -> None:
    say(bot, conn, conv, "activate line 555-0100")
    [ack] = conn.wait_for_texts(1, conv)
    job_id = JOB_ID.search(ack).group(1)  # type: ignore[union-attr]
    post, shown_id = wait_for_card(conn, conv)
    assert shown_id == job_id
    # The text answer first, then one message with one Adaptive Card (and no text beside it).
    [first, second] = conn.messages(conv)[:2]
    assert first.get("text") == ack and second == post.activity
    assert [a["contentType"] for a in second["attachments"]] == [CARD] and not second.get("text")
    card = card_in(second)
    assert card is not None
    assert card["body"][0]["text"] == TITLE
    assert facts(card)["Phone number"] == "555-0100"
    assert facts(card)["Status"].endswith(("Queued", "Running")), facts(card)
    assert_cancel_action(card, job_id)

    card_id = post.response_id
    assert card_id is not None
    done = wait_for_update(conn, conv, card_id, "Succeeded", timeout=20)
    conn.wait_for(lambda c: f"✅ Line 555-0100 is active (job `{job_id}`)." in c.texts(conv), timeout=10)
    time.sleep(1.0)  # anything that would still trickle in (a late trailing update)

    # The card shows its final state no later than the completion message says it.
    completion = next(r for r in conn.delivered(conv)
                      if r.activity and f"is active (job `{job_id}`)" in str(r.activity.get("text")))
    assert done.time <= completion.time, (
        f"the completion message went out {done.time - completion.time:.2f} s before the card's final update")
    updates = card_updates(conn, conv, card_id)
    assert updates == conn.updates(conv), "an update went to another message than the card"
    assert updates[-1] is done, "an update came after the final state"
    running = [card_in(u.activity) for u in updates if "Running" in headline(card_in(u.activity))]
    assert running, "no update showed the job Running"
    assert any(re.fullmatch(r"[█░]{10} \d+%", facts(c).get("Progress", "")) for c in running if c), running
    final = card_in(done.activity)
    assert final is not None
    assert facts(final)["Status"] == "✅ Succeeded" and "actions" not in final, final
    assert facts(final)["Job"] == job_id and "Finished" in facts(final)
    assert len(card_posts(conn, conv)) == 1, "the card was posted again instead of updated"

    # Teams' rate limit: no more than 7 sends/updates (typing included) in any second.
    assert max_in_any_second([e.time for e in conn.delivered(conv)]) <= MAX_PER_SECOND
    writes = [post.time, *(u.time for u in updates)]
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(writes)]

    [job] = stored.jobs(f"emulator:{conv}")
    assert (job["status"], job["card_activity_id"]) == ("succeeded", card_id)

    # The commands: the jobs list card, and cancelling a finished job.
    say(bot, conn, conv, "jobs")
    conn.wait_for(lambda c: any("Background jobs" in json.dumps(m.get("attachments"), ensure_ascii=False)
                                for m in c.messages(conv)), timeout=5)
    listing = next(m for m in conn.messages(conv) if "Background jobs" in json.dumps(m.get("attachments")))
    text = json.dumps(card_in(listing), ensure_ascii=False)
    assert f"`{job_id}` · Succeeded" in text and "555-0100" in text, text
    say(bot, conn, conv, f"cancel {job_id}")
    conn.wait_for(lambda c: f"Job `{job_id}` already finished (succeeded); nothing to cancel." in c.texts(conv),
                  timeout=5)
    assert stored.jobs(f"emulator:{conv}")[0]["status"] == "succeeded"

    # Throttle: at most one write to the card per ~2 s (the posting included), the final one too.
    assert all(gap >= MIN_UPDATE_GAP for gap in gaps), (
        f"card writes closer than {MIN_UPDATE_GAP}s: gaps {gaps} (post, then "
        f"{[headline(card_in(u.activity)) for u in updates]})")


@pytest.mark.cluster  # the click lands on a web instance, the job runs on the active worker
def test_cancel_with_action_execute_answers_with_the_refreshed_card(
        bot: BotProcess, conn: RecordingConnector, conv: str, stored: StoreProbe) -> None:
    say(bot, conn, conv, "activate line 555-0100")
    post, job_id = wait_for_card(conn, conv)
    card_id = post.response_id
    assert card_id is not None
    time.sleep(0.5)  # running by now

    status, body = post_invoke(bot, invoke(conn, conv, card_id, execute_cancel(job_id)))
    assert status == 200, (status, body)
    assert isinstance(body, dict), body
    assert (body.get("statusCode"), body.get("type")) == (200, CARD), f"invoke answered {body}"
    refreshed = body["value"]
    assert headline(refreshed) == "⛔ Cancelling…" and facts(refreshed)["Job"] == job_id, refreshed
    assert "actions" not in refreshed, "the Cancel button is still offered while cancelling"

    cancelled = card_in(wait_for_update(conn, conv, card_id, "Cancelled", timeout=10).activity)
    assert cancelled is not None and facts(cancelled)["Status"] == "⛔ Cancelled" and "actions" not in cancelled
    conn.wait_for(lambda c: any(re.search(rf"Job `?{job_id}`?.*was cancelled", t) for t in c.texts(conv)),
                  timeout=10)
    [job] = stored.jobs(f"emulator:{conv}")
    assert (job["status"], job["cancel_requested"]) == ("cancelled", True)
    time.sleep(1)
    assert not any("is active" in t for t in conn.texts(conv))
    assert len(card_posts(conn, conv)) == 1


@pytest.mark.cluster
def test_cancel_with_the_action_submit_fallback(bot: BotProcess, conn: RecordingConnector, conv: str,
                                                 stored: StoreProbe) -> None:
    say(bot, conn, conv, "activate line 555-0100")
    post, job_id = wait_for_card(conn, conv)
    assert post.response_id is not None
    time.sleep(0.5)

    click = message("", conversation_id=conv, service_url=conn.url, reply_to_id=post.response_id)
    click.pop("text")
    click["value"] = cancel_data(job_id)
    status, body = bot.post_activity(click)
    assert status in (200, 201), body
    conn.wait_for(lambda c: f"Cancelling job `{job_id}`…" in c.texts(conv), timeout=5)

    wait_for_update(conn, conv, post.response_id, "Cancelled", timeout=10)
    conn.wait_for(lambda c: any("was cancelled" in t for t in c.texts(conv)), timeout=10)
    [job] = stored.jobs(f"emulator:{conv}")
    assert job["status"] == "cancelled"
    assert not any("is active" in t for t in conn.texts(conv))


@pytest.mark.cluster
def test_card_actions_that_cannot_be_done_get_clear_answers(bot: BotProcess, conn: RecordingConnector,
                                                            conv: str) -> None:
    say(bot, conn, conv, "hello")  # the conversation exists; it has no job
    conn.wait_for_texts(1, conv)
    reply_to = conn.delivered(conv)[-1].response_id or "unknown"

    status, body = post_invoke(bot, invoke(conn, conv, reply_to, execute_cancel("0123456789ab")))
    assert status == 200, (status, body)
    assert isinstance(body, dict) and body.get("statusCode") == 200, body
    # Answered with a card that says so (botbuilder 4.17 cannot serialise a plain-text invoke value).
    assert body.get("type") == "application/vnd.microsoft.card.adaptive", body
    assert "no job `0123456789ab`" in json.dumps(body.get("value")), body

    action = {"type": "Action.Execute", "verb": "launchRocket", "data": {"action": "launchRocket"}}
    status, body = post_invoke(bot, invoke(conn, conv, reply_to, action))
    assert status != 500 and isinstance(body, dict), (status, body)
    invoke_status = body.get("statusCode", status)
    assert 400 <= invoke_status < 500, body
    assert body.get("type") == "application/vnd.microsoft.error", body
    assert "unknown card action" in json.dumps(body.get("value")), body


@pytest.mark.parametrize("bot_env", [{"ACTIVATE_LINE_SECONDS": "4"}])
def test_after_a_crash_the_same_card_gets_the_final_state(bot: BotProcess, conn: RecordingConnector, conv: str,
                                                          stored: StoreProbe) -> None:
    say(bot, conn, conv, "activate line 555-0100")
    post, job_id = wait_for_card(conn, conv)
    card_id = post.response_id
    assert card_id is not None
    wait_for_update(conn, conv, card_id, "Running", timeout=5)
    [job] = stored.jobs(f"emulator:{conv}")
    assert (job["status"], job["card_activity_id"]) == ("running", card_id)

    bot.kill()  # SIGKILL mid-job
    killed_at = time.monotonic()
    bot.start()
    done = wait_for_update(conn, conv, card_id, "Succeeded", timeout=20)
    assert done.time > killed_at
    conn.wait_for(lambda c: any("is active" in t for t in c.texts(conv)), timeout=10)
    time.sleep(1)
    assert len(card_posts(conn, conv)) == 1, "the restart posted a second card"
    assert {u.activity_id for u in conn.updates(conv)} == {card_id}
    assert card_updates(conn, conv, card_id)[-1] is done
    assert [t for t in conn.texts(conv) if "is active" in t] == [f"✅ Line 555-0100 is active (job `{job_id}`)."]
    [job] = stored.jobs(f"emulator:{conv}")
    assert (job["status"], job["card_activity_id"]) == ("succeeded", card_id)


# ------------------------------------------------------------------------ with the Playground

_NO_PLAYGROUND = playground_available()
needs_playground = pytest.mark.skipif(_NO_PLAYGROUND is not None, reason=_NO_PLAYGROUND or "")


def start_job(pg: Playground, where: str) -> tuple[str, str, dict[str, Any]]:
    """``activate line`` in the personal chat, the group chat or a new channel post (mentioning
    the bot where the Playground needs it); returns the conversation, the job id and its card."""
    chat = {"personal": pg.chats.personal, "group": pg.chats.group, "channel": pg.chats.channel}[where]
    sent = pg.send(chat, "activate line 555-0100", mention_bot=where != "personal")
    conversation = sent.conversation_id  # a channel post is its own thread
    card = pg.wait_for_text(conversation, lambda t: t.startswith(TITLE), timeout=10)
    content = card_in(card)
    assert content is not None
    return conversation, facts(content)["Job"], card


def job_card_content(pg: Playground, conversation: str) -> dict[str, Any] | None:
    """The job card as the chat shows it now (updates applied); None unless there is exactly one."""
    cards = [card_in(m) for m in pg.messages(conversation) if is_job_card(card_in(m))]
    return cards[0] if len(cards) == 1 else None


def wait_for_card_status(pg: Playground, conversation: str, status: str, timeout: float = 15.0) -> dict[str, Any]:
    def shows() -> bool:
        content = job_card_content(pg, conversation)
        return content is not None and status in headline(content)

    pg.wait_for(lambda _: shows(), timeout, conversation_id=conversation)
    content = job_card_content(pg, conversation)
    assert content is not None
    return content


def say_in(pg: Playground, conversation: str, where: str, text: str) -> None:
    pg.send(conversation, text, mention_bot=where != "personal")


@needs_playground
@pytest.mark.parametrize("bot_env", [{"ACTIVATE_LINE_SECONDS": "5"}])
def test_playground_personal_chat_shows_the_card_progress_and_completion(pg: Playground) -> None:
    personal = pg.chats.personal
    conversation, job_id, card = start_job(pg, "personal")
    card_message_id = card["messageId"]
    content = card_in(card)
    assert content is not None and facts(content)["Phone number"] == "555-0100"
    assert_cancel_action(content, job_id)

    final = wait_for_card_status(pg, conversation, "Succeeded", timeout=20)
    pg.wait_for_text(personal, f"✅ Line 555-0100 is active (job `{job_id}`).", timeout=10)
    assert "actions" not in final and facts(final)["Job"] == job_id
    updates = [e for e in pg.events("updateMessage", personal) if e.message_id == card_message_id]
    headlines = [headline(card_in(e.message)) for e in updates]
    assert any("Running" in h for h in headlines), headlines
    assert headlines[-1] == "✅ Succeeded", headlines
    assert [e.message_id for e in pg.events("updateMessage", personal)] == [card_message_id] * len(updates)
    creates = [e for e in pg.events("createMessage", personal) if is_job_card(card_in(e.message))]
    assert [e.message_id for e in creates] == [card_message_id], "the card was created more than once"
    assert pg.texts(personal, cards=False)[-1] == f"✅ Line 555-0100 is active (job `{job_id}`)."


def cancel_in_the_playground(pg: Playground, route: str, places: list[str]) -> None:
    """Start a job in each place, press Cancel on each card with ``route``, see each end cancelled."""
    jobs = [(where, *start_job(pg, where)) for where in places]
    time.sleep(0.5)
    for where, conversation, job_id, card in jobs:
        if route == "execute":
            status, body = pg.execute(conversation, card["messageId"], "cancelJob", cancel_data(job_id),
                                      title="Cancel")
            assert status == 200, (where, status, body)
            assert isinstance(body, dict) and body.get("type") == CARD, f"{where}: the invoke answered {body}"
            assert headline(body["value"]) == "⛔ Cancelling…", (where, body)
            assert "actions" not in body["value"], (where, body)
        else:
            pg.submit(conversation, card["messageId"], cancel_data(job_id))
            pg.wait_for_text(conversation, f"Cancelling job `{job_id}`…", timeout=5)
    for where, conversation, job_id, _ in jobs:
        final = wait_for_card_status(pg, conversation, "Cancelled", timeout=10)
        assert "actions" not in final, (where, final)
        pg.wait_for_text(conversation, f"Job `{job_id}` (activate new line) was cancelled.", timeout=10)
    time.sleep(0.5)
    for where, conversation, _, _ in jobs:
        assert not any("is active" in t for t in pg.texts(conversation)), (where, pg.texts(conversation))


@needs_playground
def test_playground_cancel_with_action_execute(pg: Playground) -> None:
    """Cancel pressed as Action.Execute in a group chat and a channel post: the invoke is answered
    with the refreshed card (Cancelling…), then the card shows Cancelled."""
    cancel_in_the_playground(pg, "execute", ["group", "channel"])


@needs_playground
def test_playground_cancel_with_the_action_submit_fallback(pg: Playground) -> None:
    """Cancel pressed as the Action.Submit fallback in the personal chat and a channel post."""
    cancel_in_the_playground(pg, "submit", ["personal", "channel"])


@needs_playground
@pytest.mark.parametrize("bot_env", [{"ACTIVATE_LINE_SECONDS": "7", "RATE_LIMIT_USER_BURST": "30"}])  # 18 at once
def test_playground_job_commands(pg: Playground) -> None:
    """help, jobs and cancel <id> in the personal chat, the group chat and a channel post (with
    an @mention where the Playground needs one), the three conversations side by side."""
    places = ["personal", "group", "channel"]
    started = {where: start_job(pg, where)[:2] for where in places}

    def in_each(text: str, expected: Callable[[str], str | Callable[[str], bool]],
                timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        """Say ``text`` everywhere, then wait for the answer ``expected(job_id)`` everywhere."""
        for where, (conversation, job_id) in started.items():
            say_in(pg, conversation, where, text.format(job_id=job_id))
        answers = {}
        for where, (conversation, job_id) in started.items():
            try:
                answers[where] = pg.wait_for_text(conversation, expected(job_id), timeout=timeout)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {text!r}: {exc}") from None
        return answers

    in_each("help", lambda _: lambda t: "offline model" in t and "`cancel JOB_ID`" in t)
    listings = in_each("jobs", lambda _: lambda t: t.startswith("Background jobs (1)"))
    for where, listing in listings.items():
        text, job_id = message_text(listing), started[where][1]
        assert "555-0100" in text and re.search(rf"`{job_id}` · (Queued|Running)", text), (where, text)
    in_each("cancel {job_id}", lambda job_id: f"Cancelling job `{job_id}`…")
    for conversation, _ in started.values():
        wait_for_card_status(pg, conversation, "Cancelled", timeout=10)
    in_each("cancel {job_id}", lambda job_id: f"Job `{job_id}` was already cancelled.")
    in_each("jobs", lambda job_id: lambda t: t.startswith("Background jobs (1)") and f"`{job_id}` · Cancelled" in t)
