"""The example tool module (examples/weather.py, README "Add your own tools") in Microsoft's Agents
Playground: a newcomer's plain tool and long-running tool, loaded by TOOL_MODULES alone, answered
in the turn and as an announced background job, and offered on the welcome card."""

from __future__ import annotations

import pytest

from harness.playground import Playground, message_text, playground_available

pytestmark = pytest.mark.e2e

_UNAVAILABLE = playground_available()
if _UNAVAILABLE is not None:
    pytest.skip(_UNAVAILABLE, allow_module_level=True)


@pytest.fixture
def bot_env() -> dict[str, str]:
    """Overrides conftest's: the demo and the example module, a 2-second weather report."""
    return {"TOOL_MODULES": "jobs.activate_line,examples.weather", "WEATHER_REPORT_SECONDS": "2"}


def test_the_example_tools_work_in_the_playground(pg: Playground) -> None:
    personal = pg.chats.personal
    pg.install(personal)
    [welcome] = pg.wait_for_messages(1, personal)
    buttons = [a["title"] for a in welcome["attachments"][0]["content"]["actions"]]
    assert {"Try: weather in Paris", "Try: weather report for Oslo"} <= set(buttons), buttons
    assert "Hi!" in message_text(welcome)

    pg.send(personal, "weather in Paris")  # the plain tool: answered in the turn
    pg.wait_for_text(personal, lambda t: t.startswith("The weather in Paris today: "))

    pg.send(personal, "weather report for Oslo")  # the long-running tool: a job, then its announcement
    pg.wait_for_text(personal, lambda t: "background job" in t)
    pg.wait_for_text(personal, lambda t: t.startswith("🌦️ Weather report for Oslo: day 1: "), timeout=30)
