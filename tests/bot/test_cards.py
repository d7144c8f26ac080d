"""The shapes of the cards in bot/cards.py: what each job state shows, the Cancel action, the jobs list.

(Escaping and size limits of the same cards: test_card_escaping.py.)
"""

from __future__ import annotations

from typing import Any

import pytest

from bot.cards import (
    CANCEL_VERB,
    CARD_CONTENT_TYPE,
    job_card,
    job_card_activity,
    jobs_list_card,
    parse_cancel,
    progress_bar,
)
from runtime.protocol import Requester
from storage.abc import JSON, JobRecord

NOW = 1_700_000_100.0
ADA: JSON = {"id": "29:ada", "name": "Ada", "aadObjectId": "aad-ada", "conversationType": "groupChat"}


def job(**fields: Any) -> JobRecord:
    values: dict[str, Any] = {"id": "0d73272971a7", "conversation_key": "msteams:c1", "tool": "activate_line",
                              "arguments": {"phone_number": "555-0100"}, "created_at": NOW - 65, "started_by": ADA}
    return JobRecord(**{**values, **fields})


def facts(card: JSON) -> dict[str, str]:
    return {f["title"]: f["value"] for block in card["body"] if block["type"] == "FactSet" for f in block["facts"]}


def headline(card: JSON) -> tuple[str, str]:
    title, status = card["body"][0], card["body"][1]
    return title["text"], status["text"]


def test_a_card_is_an_adaptive_card_in_a_message_with_a_summary() -> None:
    activity = job_card_activity(job(status="running"))
    assert activity["type"] == "message" and activity["summary"] == "Activate line: running"
    [attachment] = activity["attachments"]
    assert attachment["contentType"] == CARD_CONTENT_TYPE
    card = attachment["content"]
    assert (card["type"], card["version"]) == ("AdaptiveCard", "1.5")


def test_a_running_job_shows_progress_step_elapsed_time_and_cancel() -> None:
    card = job_card(job(status="running", progress=0.5, progress_text="Provisioning", started_at=NOW - 65), NOW)
    assert headline(card) == ("Activate line", "🔄 Running")
    shown = facts(card)
    assert shown["Job"] == "0d73272971a7" and shown["Phone number"] == "555-0100" and "Ada" in shown["Started by"]
    assert shown["Status"] == "🔄 Running" and shown["Progress"] == progress_bar(0.5)
    assert shown["Step"] == "Provisioning" and shown["Elapsed"] == "1 min 5 s" and "Finished" not in shown
    [cancel] = card["actions"]
    assert (cancel["type"], cancel["verb"], cancel["data"]) == ("Action.Execute", CANCEL_VERB,
                                                                {"action": CANCEL_VERB, "jobId": "0d73272971a7"})
    # Clients without Universal Actions fall back to a Submit with the same data.
    assert cancel["fallback"] == {"type": "Action.Submit", "title": "Cancel", "data": cancel["data"]}


@pytest.mark.parametrize(("status", "label"), [("succeeded", "✅ Succeeded"), ("failed", "❌ Failed"),
                                               ("cancelled", "⛔ Cancelled")])
def test_a_finished_job_shows_its_end_and_no_cancel(status: str, label: str) -> None:
    card = job_card(job(status=status, progress=0.7, progress_text="Provisioning", finished_at=NOW), NOW)
    assert headline(card)[1] == label and "actions" not in card
    shown = facts(card)
    assert "Finished" in shown and not {"Progress", "Step", "Elapsed"} & set(shown)


def test_success_shows_the_result_message_and_failure_the_error() -> None:
    done = job_card(job(status="succeeded", result={"message": "Line 555-0100 is active."}), NOW)
    assert done["body"][-1]["text"] == "Line 555-0100 is active."
    failed = job_card(job(status="failed", error="Carrier system unavailable"), NOW)
    assert failed["body"][-1]["text"] == "Carrier system unavailable" and failed["body"][-1]["color"] == "attention"


def test_a_requested_cancel_shows_cancelling_and_hides_the_button() -> None:
    card = job_card(job(status="running", cancel_requested=True), NOW)
    assert headline(card)[1] == "⛔ Cancelling…" and "actions" not in card


def test_a_queued_retry_shows_the_attempt_and_when_it_runs() -> None:
    shown = facts(job_card(job(status="queued", attempt=2, max_attempts=3, next_retry_at=NOW + 30), NOW))
    assert shown["Attempt"] == "2 of 3" and shown["Retry in"] == "30 s" and "Progress" not in shown


def test_a_notice_is_shown_under_the_job() -> None:
    card = job_card(job(status="running"), NOW, notice="Only Ada can cancel it.")
    assert card["body"][-1]["text"] == "Only Ada can cancel it."


def test_progress_bar() -> None:
    assert progress_bar(None) == "-"
    assert progress_bar(0.0) == "░" * 10 + " 0%"
    assert progress_bar(0.25) == "██" + "░" * 8 + " 25%"  # rounds to the nearest cell


def test_the_jobs_list_shows_the_newest_twenty_with_who_started_them() -> None:
    assert "No background jobs" in jobs_list_card([])["body"][0]["text"]
    jobs = [job(id=f"job{n:09d}", created_at=NOW + n, status="running", progress=0.5) for n in range(25)]
    card = jobs_list_card(jobs, viewer=Requester(id="29:ada", aad_object_id="aad-ada", conversation_type="groupChat"))
    assert card["body"][0]["text"] == "Background jobs (25)"
    rows = [b for b in card["body"] if b["type"] == "ColumnSet"]
    assert len(rows) == 20 and card["body"][-1]["text"] == "…and 5 older jobs"
    first = rows[0]["columns"][1]["items"]
    assert "job000000005" in first[1]["text"] and "started by Ada" in first[1]["text"]
    assert "555-0100" in first[0]["text"]  # Ada sees the arguments of her own job


def test_the_jobs_list_hides_other_peoples_arguments_in_shared_conversations() -> None:
    bob = Requester(id="29:bob", aad_object_id="aad-bob", conversation_type="groupChat")
    [row] = [b for b in jobs_list_card([job()], viewer=bob)["body"] if b["type"] == "ColumnSet"]
    assert "555-0100" not in str(row)


@pytest.mark.parametrize(("value", "job_id"), [
    ({"action": CANCEL_VERB, "jobId": "0d73272971a7"}, "0d73272971a7"),
    ({"action": "somethingElse", "jobId": "0d73272971a7"}, None),
    ({"action": CANCEL_VERB, "jobId": 7}, None),
    ("cancel 0d73272971a7", None),
    (None, None),
])
def test_parse_cancel_reads_only_a_cancel_click(value: Any, job_id: str | None) -> None:
    assert parse_cancel(value) == job_id
