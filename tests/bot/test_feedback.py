"""Feedback (bot/feedback.py): the parser's hostile cases, and where the operator's endpoint is served.

The invoke end to end (stored, 404 for a message never sent, clipped comments) is in
tests/e2e/test_streaming.py; the Playground click in tests/e2e/test_playground_ui.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from app import create_app
from bot.feedback import MAX_COMMENT_CHARS, FeedbackError, parse_feedback
from runtime.config import Settings
from storage.memory import MemoryStore

TOKEN = "ops-token-0123456789abcdef"


@pytest.mark.parametrize("value", [None, "like", {"actionName": "feedback"}, {"actionName": "other"},
                                   {"actionName": "feedback", "actionValue": {"reaction": "LIKE"}},
                                   {"actionName": "feedback", "actionValue": {"reaction": "like", "feedback": [1]}},
                                   {"actionName": "feedback", "actionValue": {"reaction": "like",
                                                                              "feedback": '{"feedbackText": 5}'}}])
def test_malformed_feedback_is_a_400(value: object) -> None:
    with pytest.raises(FeedbackError) as refused:
        parse_feedback(value)
    assert refused.value.status == 400


def test_the_comment_as_teams_and_the_playground_send_it() -> None:
    teams = {"actionName": "feedback", "actionValue": {"reaction": "dislike",
                                                       "feedback": '{"feedbackText": " Too long\\u0007 "}'}}
    assert parse_feedback(teams) == ("dislike", "Too long")
    playground = {"actionName": "feedback", "actionValue": {"reaction": "like", "feedback": "x" * 5000}}
    reaction, comment = parse_feedback(playground)
    assert reaction == "like" and len(comment) == MAX_COMMENT_CHARS + 1 and comment.endswith("…")


async def feedback_status(settings: Settings, headers: dict[str, str] | None = None) -> int:
    app = create_app(settings, store=MemoryStore())
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/feedback", params={"conversation": "msteams:a:1"}, headers=headers or {})
        return response.status


async def test_the_feedback_endpoint_is_behind_ops_token_and_never_open_outside_local_mode(tmp_path: Path) -> None:
    base = {"data_dir": tmp_path, "mcp_config": tmp_path / "no-mcp.json"}
    authenticated = {**base, "app_id": "00000000-0000-0000-0000-000000000001", "app_password": "secret"}
    assert await feedback_status(Settings(**authenticated)) == 404  # type: ignore[arg-type]  # people's comments
    with_token = Settings(**authenticated, ops_token=TOKEN)  # type: ignore[arg-type]
    assert await feedback_status(with_token) == 401
    assert await feedback_status(with_token, {"Authorization": "Bearer wrong-token-0123456789"}) == 401
    assert await feedback_status(with_token, {"Authorization": f"Bearer {TOKEN}"}) == 200
    assert await feedback_status(Settings(**base)) == 200  # type: ignore[arg-type]  # local mode: loopback only
