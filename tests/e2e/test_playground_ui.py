"""The live job card as a person sees it: the Agents Playground's web UI in headless Chromium.

The bot and the Playground run as in ``test_playground.py``; the page is opened with Debian's
chromium through npm playwright-core (``harness/screenshot.mjs``). The Playground keeps
no history for its UI (it shows what arrives on its WebSocket once connected), so the page is
opened first and the user's request is then sent through the Playground's API, as the UI's
compose box would. Screenshots land in ``test-artifacts/`` (git-ignored) for a human to check.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from agent.offline_model import DURABILITY
from harness.botproc import http_request
from harness.browser import ARTIFACTS_DIR, PlaygroundPage, browser_unavailable, png_size
from harness.playground import Playground, playground_available

pytestmark = pytest.mark.e2e

_UNAVAILABLE = playground_available() or browser_unavailable()
if _UNAVAILABLE is not None:
    pytest.skip(_UNAVAILABLE, allow_module_level=True)

SCREENSHOT = ARTIFACTS_DIR / "playground-job-card.png"
RUNNING_SCREENSHOT = ARTIFACTS_DIR / "playground-job-card-running.png"


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    """Overrides conftest's: the store is not what this test looks at; once is enough."""
    return str(request.param)


@pytest.fixture
def bot_env() -> dict[str, str]:
    """The job runs long enough for the page to show it Running before it succeeds."""
    return {"ACTIVATE_LINE_SECONDS": "4"}


def personal_chat_spec(pg: Playground, failure_screenshot: str, timeout_ms: int) -> dict[str, object]:
    """What every UI run here starts from: the Playground's personal chat, a timeout, where a failure's picture goes."""
    return {"url": f"{pg.base_url}/", "chat": "Personal Chat", "timeoutMs": timeout_ms,
            "failureScreenshot": str(ARTIFACTS_DIR / failure_screenshot)}


def test_the_job_card_renders_live_in_the_playground_web_ui(pg: Playground, tmp_path: Path) -> None:
    for stale in (SCREENSHOT, RUNNING_SCREENSHOT):
        stale.unlink(missing_ok=True)
    personal = pg.chats.personal
    spec = {
        **personal_chat_spec(pg, "playground-job-card-failed.png", 20000),
        "steps": [
            {"name": "running", "card": ["Activate new line", "555-0100", "Running", "Progress"],
             "screenshot": str(RUNNING_SCREENSHOT)},
            {"name": "succeeded", "card": ["Activate new line", "555-0100", "Succeeded"],
             "screenshot": str(SCREENSHOT)},
        ],
    }
    with PlaygroundPage(spec, log_path=tmp_path / "browser.log") as page:
        page.wait_ready(timeout=60)
        pg.install(personal)
        pg.wait_for_messages(1, personal)  # the welcome card
        pg.send(personal, "activate line 555-0100")
        ack = pg.wait_for_text(personal, lambda t: t.startswith("I've started activating line 555-0100"))
        match = re.search(r"job `([0-9a-f]{12})`", ack["text"])
        assert match, ack["text"]
        job_id = match.group(1)

        running = page.expect("step", timeout=30)
        assert running["name"] == "running"
        assert job_id in running["text"] and "%" in running["text"], running["text"]  # a progress bar
        assert "Cancel" in running["buttons"], f"no Cancel button on the running card: {running['buttons']}"

        succeeded = page.expect("step", timeout=30)  # the same card, updated in place by the bot
        assert succeeded["name"] == "succeeded"
        assert job_id in succeeded["text"] and "Line 555-0100 is active" in succeeded["text"], succeeded["text"]
        assert "Cancel" not in succeeded["buttons"], succeeded["buttons"]

        done = page.expect("done", timeout=30)
        assert page.stop() == 0
    # An update the UI could not apply shows up as a "Saga error" in its console.
    assert [e for e in done["consoleErrors"] if "Saga error" in e] == [], done["consoleErrors"]
    # The card was updated in place: one card message, however many updates.
    cards = [m for m in pg.messages(personal) if "Activate new line" in str(m.get("attachments"))]
    assert len(cards) == 1
    assert pg.events("updateMessage", personal), "the card was never updated"

    for shot in (RUNNING_SCREENSHOT, SCREENSHOT):
        assert shot.is_file(), f"{shot} was not written"
        assert shot.stat().st_size > 20_000, f"{shot} is suspiciously small ({shot.stat().st_size} bytes)"
        assert png_size(shot) == (1280, 900)


BUTTONS_SCREENSHOT = ARTIFACTS_DIR / "playground-buttons.png"


@pytest.mark.parametrize("bot_env", [{"ACTIVATE_LINE_SECONDS": "1"}])
def test_the_welcome_and_reset_buttons_work_in_the_playground_web_ui(pg: Playground, tmp_path: Path) -> None:
    """Pressing the welcome card's buttons and reset's Yes / No in the UI: the bot gets each press as
    a message and answers it (the Playground supports no imBack; these are Action.Submit)."""
    BUTTONS_SCREENSHOT.unlink(missing_ok=True)
    personal = pg.chats.personal
    welcome = ["Hi! I'm your durable agent"]
    spec = {
        **personal_chat_spec(pg, "playground-buttons-failed.png", 20000),
        "steps": [
            {"name": "help", "card": welcome, "click": "Help"},
            {"name": "try", "card": welcome, "click": "Try: activate line 555-0100"},
            {"name": "no", "card": ["Reset?"], "click": "No"},
            {"name": "yes", "card": ["Reset?"], "nth": 1, "click": "Yes", "screenshot": str(BUTTONS_SCREENSHOT)},
        ],
    }
    with PlaygroundPage(spec, log_path=tmp_path / "browser.log") as page:
        page.wait_ready(timeout=60)
        pg.install(personal)
        pg.wait_for_messages(1, personal)  # the welcome card

        assert page.expect("step", timeout=30)["clicked"] == "Help"
        pg.wait_for_text(personal, lambda t: "`list jobs`" in t and "`reset`" in t)
        assert page.expect("step", timeout=30)["clicked"] == "Try: activate line 555-0100"
        pg.wait_for_text(personal, lambda t: t.startswith("I've started activating line 555-0100"))
        pg.wait_for_text(personal, lambda t: t.startswith("✅ Line 555-0100 is active"), timeout=20)

        pg.send(personal, "my name is Ada")
        pg.wait_for_text(personal, "Nice to meet you, Ada. I'll remember that.")
        pg.send(personal, "reset")
        no = page.expect("step", timeout=30)
        assert no["clicked"] == "No" and [b for b in no["buttons"] if b in ("Yes", "No")] == ["Yes", "No"]
        pg.wait_for_text(personal, "OK, I kept everything.")
        pg.send(personal, "reset")
        assert page.expect("step", timeout=30)["clicked"] == "Yes"
        pg.wait_for_text(personal, lambda t: "forgotten" in t)
        pg.send(personal, "what is my name?")
        pg.wait_for_text(personal, "You haven't told me your name yet.")
        done = page.expect("done", timeout=30)
        assert page.stop() == 0
    assert [e for e in done["consoleErrors"] if "Saga error" in e] == [], done["consoleErrors"]
    # No press was refused by the Playground ("Action type ... is not supported yet").
    assert not [n for n in pg.log_notes() if "not supported" in n], pg.log_notes()
    assert BUTTONS_SCREENSHOT.is_file() and png_size(BUTTONS_SCREENSHOT) == (1280, 900)


STREAMING_SCREENSHOT = ARTIFACTS_DIR / "playground-streaming.png"
STREAMED_SCREENSHOT = ARTIFACTS_DIR / "playground-streamed-answer.png"


def test_a_streamed_answer_with_its_ai_label_and_a_thumbs_up_in_the_playground_web_ui(
        pg: Playground, bot: Any, tmp_path: Path) -> None:
    """Issue 15: the Playground renders streaminfo (the message grows in place), the AI label and the
    feedback buttons; a click on Like and Submit reaches the bot, which stores it. (The Playground
    0.2.28 sends that invoke without replyToId, so it is stored naming no message.)"""
    for stale in (STREAMING_SCREENSHOT, STREAMED_SCREENSHOT):
        stale.unlink(missing_ok=True)
    personal = pg.chats.personal
    first_words, last_words = DURABILITY[:40], DURABILITY[-40:]
    spec = {
        **personal_chat_spec(pg, "playground-streaming-failed.png", 30000),
        "steps": [
            {"name": "streaming", "text": [first_words], "screenshot": str(STREAMING_SCREENSHOT)},
            {"name": "final", "text": [last_words, "AI generated"], "screenshot": str(STREAMED_SCREENSHOT),
             "press": ["Like"]},
            {"name": "form", "text": ["What did you like?"], "press": ["Submit"]},
            {"name": "thanks", "text": ["Thank you!"]},
        ],
    }
    with PlaygroundPage(spec, log_path=tmp_path / "browser.log") as page:
        page.wait_ready(timeout=60)
        pg.install(personal)
        pg.wait_for_messages(1, personal)  # the welcome card
        pg.send(personal, "explain durability")
        streaming = page.expect("step", timeout=40)
        assert streaming["name"] == "streaming"
        assert last_words not in streaming["text"], "the answer was not streamed: it arrived whole"
        final = page.expect("step", timeout=40)
        assert final["name"] == "final"
        assert page.expect("step", timeout=30)["name"] == "form"
        assert page.expect("step", timeout=30)["name"] == "thanks"
        page.expect("done", timeout=30)
        assert page.stop() == 0
    # One message, grown in place: the stream's first send created it, the rest updated it.
    answers = [m for m in pg.messages(personal) if DURABILITY[:20] in str(m.get("text"))]
    assert len(answers) == 1, answers
    status, body = http_request(f"{bot.base_url}/feedback?conversation=" +
                                urllib.parse.quote(f"msteams:{personal}"))
    assert status == 200, body
    [entry] = json.loads(body)["feedback"]
    assert entry["reaction"] == "like" and entry["by"]["id"]
    for shot in (STREAMING_SCREENSHOT, STREAMED_SCREENSHOT):
        assert shot.is_file() and png_size(shot) == (1280, 900)


APPROVAL_SCREENSHOT = ARTIFACTS_DIR / "playground-approval-card.png"
DECIDED_SCREENSHOT = ARTIFACTS_DIR / "playground-approval-decided.png"


@pytest.mark.parametrize("bot_env", [{"ACTIVATE_LINE_SECONDS": "3", "APPROVAL_REQUIRED_TOOLS": "activate_new_line"}])
def test_the_approval_card_is_approved_in_the_playground_web_ui(pg: Playground, tmp_path: Path) -> None:
    """Issue 16: the approval card, Approve pressed in the UI (an Action.Execute), the card changing in
    place to show who approved it, then the job's progress and its completion."""
    for stale in (APPROVAL_SCREENSHOT, DECIDED_SCREENSHOT):
        stale.unlink(missing_ok=True)
    personal = pg.chats.personal
    spec = {
        **personal_chat_spec(pg, "playground-approval-failed.png", 20000),
        "steps": [
            {"name": "asked", "card": ["Approval needed", "555-0100", "Approve", "Reject"], "click": "Approve",
             "screenshot": str(APPROVAL_SCREENSHOT)},
            {"name": "decided", "card": ["Activate new line", "555-0100", "Approved by"],
             "any": ["Queued", "Running"], "screenshot": str(DECIDED_SCREENSHOT)},
            {"name": "succeeded", "card": ["Activate new line", "Succeeded", "Approved by"]},
        ],
    }
    with PlaygroundPage(spec, log_path=tmp_path / "browser.log") as page:
        page.wait_ready(timeout=60)
        pg.install(personal)
        pg.wait_for_messages(1, personal)  # the welcome card
        pg.send(personal, "activate line 555-0100")
        pg.wait_for_text(personal, lambda t: "needs a person's approval" in t)
        asked = page.expect("step", timeout=30)
        assert asked["clicked"] == "Approve", asked
        decided = page.expect("step", timeout=30)  # the same card, changed in place
        assert "Approve" not in decided["buttons"], decided["buttons"]
        assert page.expect("step", timeout=30)["name"] == "succeeded"
        pg.wait_for_text(personal, lambda t: "is starting now" in t)
        pg.wait_for_text(personal, lambda t: t.startswith("✅ Line 555-0100 is active"), timeout=20)
        done = page.expect("done", timeout=30)
        assert page.stop() == 0
    assert [e for e in done["consoleErrors"] if "Saga error" in e] == [], done["consoleErrors"]
    assert not [n for n in pg.log_notes() if "not supported" in n], pg.log_notes()
    cards = [m for m in pg.messages(personal) if "Phone number" in str(m.get("attachments"))]
    assert len(cards) == 1, cards  # one card for the request, updated in place (not the welcome card)
    for shot in (APPROVAL_SCREENSHOT, DECIDED_SCREENSHOT):
        assert shot.is_file() and png_size(shot) == (1280, 900), shot
