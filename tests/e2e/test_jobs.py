"""Long-running tools as durable jobs, end to end: immediate answer, proactive completion, crashes."""

from __future__ import annotations

import json
import re
import time

import pytest

from harness.botproc import BotProcess
from harness.connector import RecordingConnector
from runtime.untrusted import tool_output_data
from tests.e2e.conftest import Launch, StoreProbe
from tests.e2e.test_conversation import say

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

JOB_ID = re.compile(r"job `([0-9a-f]{12})`")


def job_id_in(text: str) -> str:
    match = JOB_ID.search(text)
    assert match, f"no job id in {text!r}"
    return match.group(1)


def completions(conn: RecordingConnector, conv: str) -> list[str]:
    return [t for t in conn.texts(conv) if "is active" in t]


def test_activation_answers_at_once_and_announces_completion(bot: BotProcess, conn: RecordingConnector, conv: str,
                                                             stored: StoreProbe) -> None:
    started = time.monotonic()
    say(bot, conn, conv, "activate line 555-0100")
    [ack] = conn.wait_for_texts(1, conv, timeout=5)
    assert time.monotonic() - started < 2.0
    job_id = job_id_in(ack)
    assert "555-0100" in ack and "message you" in ack

    [_, done] = conn.wait_for_texts(2, conv, timeout=15)
    assert time.monotonic() - started >= 2.0  # ACTIVATE_LINE_SECONDS
    assert done == f"✅ Line 555-0100 is active (job `{job_id}`)."

    messages = stored.agent_messages(f"emulator:{conv}")
    [call] = [c for m in messages if m["type"] == "AssistantMessage" and isinstance(m["content"], list)
              for c in m["content"] if c["name"] != "background_job_result"]
    assert call["name"] == "activate_new_line" and json.loads(call["arguments"]) == {"phone_number": "555-0100"}
    [outcome] = [r for m in messages if m["type"] == "FunctionExecutionResultMessage"
                 for r in m["content"] if r["name"] == "background_job_result"]
    result = json.loads(tool_output_data(outcome["content"]))
    assert result["call_id"] == call["id"] and result["status"] == "succeeded"
    assert json.loads(result["content"])["status"] == "active"
    [job] = stored.jobs(f"emulator:{conv}")
    assert (job["status"], job["attempt"], job["call_id"], job["progress"]) == ("succeeded", 1, call["id"], 1.0)


@pytest.mark.parametrize("crash_at", [
    "turn_committed",  # the job is recorded but not yet started
    "job_progress:2",  # the job is running
    "job_event_appended",  # the job finished, its record not yet marked finished
    "turn_committed:2",  # the completion turn is committed, the message not yet sent
])
def test_sigkill_around_a_job_announces_it_exactly_once(launch: Launch, conn: RecordingConnector, conv: str,
                                                        crash_at: str, stored: StoreProbe) -> None:
    bot = launch({"ACTIVATE_LINE_SECONDS": "2", "CRASH_AT": crash_at})
    say(bot, conn, conv, "activate line 555-0199")
    bot.wait_exited(15)
    assert not bot.alive, f"the process never reached crash point {crash_at}"
    assert "crash point" in bot.log_tail()
    bot.extra_env.pop("CRASH_AT")
    bot.start()
    conn.wait_for(lambda c: len(completions(c, conv)) >= 1, timeout=20)
    time.sleep(1.5)
    assert len(completions(conn, conv)) == 1, conn.texts(conv)
    acks = [t for t in conn.texts(conv) if "started activating" in t]
    assert len(acks) == 1, conn.texts(conv)
    [job] = stored.jobs(f"emulator:{conv}")
    assert job["status"] == "succeeded"


def test_sigkill_between_send_and_mark_repeats_at_most_one_message(launch: Launch, conn: RecordingConnector,
                                                                   conv: str) -> None:
    bot = launch({"ACTIVATE_LINE_SECONDS": "1", "CRASH_AT": "message_sent:2"})
    say(bot, conn, conv, "activate line 555-0142")
    bot.wait_exited(15)
    assert not bot.alive
    bot.extra_env.pop("CRASH_AT")
    bot.start()
    time.sleep(2)
    assert 1 <= len(completions(conn, conv)) <= 2
    assert len(conn.texts(conv)) <= 3


@pytest.mark.parametrize("bot_env", [{"ACTIVATE_LINE_SECONDS": "2", "MAX_ACTIVE_JOBS_PER_USER": "10",
                                      "RATE_LIMIT_USER_BURST": "20"}])  # 12 at once
@pytest.mark.parametrize("count", [2, 10])
def test_parallel_jobs_are_each_reported(bot: BotProcess, conn: RecordingConnector, conv: str, stored: StoreProbe,
                                         count: int) -> None:
    numbers = [f"555-{100 + n:04d}" for n in range(count)]
    for number in numbers:
        say(bot, conn, conv, f"activate line {number}")
    say(bot, conn, conv, "my name is Ada")  # chatting while the jobs run and finish
    conn.wait_for(lambda c: len(completions(c, conv)) >= count, timeout=30)
    say(bot, conn, conv, "what is my name?")
    conn.wait_for(lambda c: "Your name is Ada." in c.texts(conv), timeout=10)
    time.sleep(0.5)
    done = completions(conn, conv)
    assert sorted(re.search(r"Line (\S+) is active", t).group(1) for t in done) == numbers  # type: ignore[union-attr]
    results = [r for m in stored.agent_messages(f"emulator:{conv}") if m["type"] == "FunctionExecutionResultMessage"
               for r in m["content"] if r["name"] == "background_job_result"]
    assert len({json.loads(tool_output_data(r["content"]))["job_id"] for r in results}) == min(count, len(results))
    assert all(j["status"] == "succeeded" for j in stored.jobs(f"emulator:{conv}"))


@pytest.mark.parametrize("bot_env", [{"ACTIVATE_LINE_SECONDS": "8"}])
def test_cancel_a_running_job_and_ask_about_jobs(bot: BotProcess, conn: RecordingConnector, conv: str,
                                                 stored: StoreProbe) -> None:
    say(bot, conn, conv, "activate line 555-0100")
    job_id = job_id_in(conn.wait_for_texts(1, conv)[0])
    time.sleep(1)
    say(bot, conn, conv, "is it done?")
    assert "**running**" in conn.wait_for_texts(2, conv)[1]
    say(bot, conn, conv, f"cancel {job_id}")
    conn.wait_for(lambda c: any("was cancelled" in t for t in c.texts(conv)), timeout=10)
    assert any(t.startswith(f"Cancelling job `{job_id}`") for t in conn.texts(conv))
    say(bot, conn, conv, f"cancel {job_id}")
    conn.wait_for(lambda c: f"Job `{job_id}` was already cancelled." in c.texts(conv), timeout=10)
    say(bot, conn, conv, "list jobs")
    conn.wait_for(lambda c: any(job_id in json.dumps(m["attachments"]) and "Cancelled" in json.dumps(m["attachments"])
                                for m in c.messages(conv) if "background job" in (m.get("summary") or "")), timeout=10)
    assert completions(conn, conv) == []
    [job] = stored.jobs(f"emulator:{conv}")
    assert job["status"] == "cancelled"


def test_bad_job_requests_get_clear_answers(bot: BotProcess, conn: RecordingConnector, conv: str,
                                            stored: StoreProbe) -> None:
    say(bot, conn, conv, "activate line banana")
    assert "'banana' is not a phone number" in conn.wait_for_texts(1, conv)[0]
    say(bot, conn, conv, "status 0123456789ab")
    assert "no job `0123456789ab`" in conn.wait_for_texts(2, conv)[1]
    say(bot, conn, conv, "cancel nosuchjob")
    assert "no job `nosuchjob`" in conn.wait_for_texts(3, conv)[2]
    say(bot, conn, conv, "activate line 555-0100")
    conn.wait_for(lambda c: len(completions(c, conv)) == 1, timeout=15)
    job_id = stored.jobs(f"emulator:{conv}")[0]["id"]
    say(bot, conn, conv, f"cancel {job_id}")
    conn.wait_for(lambda c: any("already finished (succeeded)" in t for t in c.texts(conv)), timeout=10)
    assert len(stored.jobs(f"emulator:{conv}")) == 1


@pytest.mark.parametrize("bot_env", [{"ACTIVATE_LINE_SECONDS": "3"}])
def test_sigterm_mid_job_hands_it_back_and_the_restart_finishes_it(bot: BotProcess, conn: RecordingConnector,
                                                                    conv: str, stored: StoreProbe) -> None:
    say(bot, conn, conv, "activate line 555-0111")
    conn.wait_for_texts(1, conv)
    time.sleep(1)
    assert bot.terminate() == 0, bot.log_tail()
    [job] = stored.jobs(f"emulator:{conv}")
    assert (job["status"], job["attempt"]) == ("queued", 0)
    bot.start()
    conn.wait_for(lambda c: len(completions(c, conv)) == 1, timeout=15)
    [job] = stored.jobs(f"emulator:{conv}")
    assert (job["status"], job["attempt"]) == ("succeeded", 1)
