"""Job cards show untrusted text literally and stay within Teams' message size (issue 13, findings 11, 16)."""

from __future__ import annotations

import json

from agent.outgoing import TEAMS_MESSAGE_BYTES, activity_bytes
from agent.tools import describe_job
from bot.cards import job_card, job_card_activity, jobs_list_card, notice_card
from storage.abc import JobRecord

PHISH = "[Microsoft login](https://login.micros0ft.example/)"
ESCAPED = r"\[Microsoft login\]\(https://login.micros0ft.example/\)"


def job(**fields: object) -> JobRecord:
    values: dict[str, object] = {"id": "0d73272971a7", "conversation_key": "emulator:c1", "tool": "fetch_report",
                                 "arguments": {"topic": PHISH}}
    return JobRecord(**{**values, **fields})  # type: ignore[arg-type]


def texts(card: dict[str, object]) -> str:
    return json.dumps(card, ensure_ascii=False)


def test_a_job_card_escapes_arguments_results_errors_and_progress() -> None:
    running = job_card(job(status="running", progress=0.5, progress_text=f"reading {PHISH}"))
    facts = {f["title"]: f["value"] for item in running["body"] if item["type"] == "FactSet" for f in item["facts"]}
    assert facts["Topic"] == ESCAPED and facts["Step"] == f"reading {ESCAPED}"
    done = job_card(job(status="succeeded", result={"message": f"See {PHISH}"}))
    failed = job_card(job(status="failed", error=f"Go to {PHISH}"))
    for card in (running, done, failed):
        assert PHISH not in texts(card)
    assert f"See {ESCAPED}" in [b.get("text") for b in done["body"]]
    assert f"Go to {ESCAPED}" in [b.get("text") for b in failed["body"]]


def test_the_jobs_list_and_notices_escape_too() -> None:
    listing = jobs_list_card([job(), job(id="x`](https://evil.example/)", status="failed")])
    assert PHISH not in texts(listing) and "`](" not in texts(listing)
    assert ESCAPED in texts(listing).replace("\\\\", "\\")
    assert PHISH not in describe_job(job(status="failed", error=PHISH)) and ESCAPED in describe_job(job())
    assert notice_card("fixed text")["body"][0]["text"] == "fixed text"


def test_a_card_with_huge_fields_stays_within_the_teams_limit() -> None:
    huge = "x" * 1_000_000
    big = job(arguments={f"arg{n}": huge for n in range(50)}, status="succeeded", result={"message": huge},
              progress_text=huge)
    assert activity_bytes(job_card_activity(big)) < TEAMS_MESSAGE_BYTES
    assert activity_bytes(job_card_activity(big.evolve(status="failed", error=huge))) < TEAMS_MESSAGE_BYTES
    listing = jobs_list_card([big.evolve(id=f"job{n:08d}") for n in range(40)])
    assert activity_bytes({"type": "message", "attachments": [{"content": listing}]}) < TEAMS_MESSAGE_BYTES
