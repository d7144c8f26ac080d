"""Hostile and malformed activities (property-based): never a 5xx, never a crash, no damage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.activities import message, new_conversation_id
from harness.botproc import BotProcess
from harness.connector import RecordingConnector

pytestmark = pytest.mark.e2e

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
FIELDS = ["type", "id", "text", "from", "recipient", "conversation", "serviceUrl", "channelId", "entities",
          "channelData", "membersAdded", "value", "attachments", "timestamp", "replyToId", "name", "locale"]


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BotProcess, RecordingConnector]]:
    # Hundreds of messages from one user: rate limits high enough never to refuse one, yet on (and fuzzed).
    env = {"LOG_LEVEL": "WARNING", "RATE_LIMIT_USER_BURST": "100000", "RATE_LIMIT_USER_PER_MINUTE": "100000"}
    with RecordingConnector() as conn, BotProcess(tmp_path_factory.mktemp("fuzz"), env=env) as bot:
        yield bot, conn


def post_raw(bot: BotProcess, body: bytes) -> tuple[int, str]:
    return bot.post_activity({}, raw_body=body)


def assert_handled(status: int, text: str) -> None:
    assert status < 500 or status == 503, f"{status}: {text[:300]}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values)
def test_any_json_gets_a_clear_answer(fuzz_target: tuple[BotProcess, RecordingConnector], body: Any) -> None:
    bot, _ = fuzz_target
    assert_handled(*post_raw(bot, json.dumps(body).encode()))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=json_values, drop=st.lists(st.sampled_from(FIELDS), max_size=3))
def test_a_valid_activity_with_one_field_broken(fuzz_target: tuple[BotProcess, RecordingConnector], field: str,
                                                value: Any, drop: list[str]) -> None:
    bot, conn = fuzz_target
    activity: dict[str, Any] = message("hello", conversation_id=new_conversation_id("fuzz"), service_url=conn.url)
    activity[field] = value
    for name in drop:
        activity.pop(name, None)
    if field == "serviceUrl" or "serviceUrl" in drop:  # never send the bot's replies to a random host
        activity.pop("serviceUrl", None)
    assert_handled(*post_raw(bot, json.dumps(activity).encode()))


@pytest.mark.parametrize("body", [
    b'{"type": "message", "text": "\\ud800\\udfff\\ud800", "conversation": {"id": "c"}, "serviceUrl": "http://x"}',
    b"\xff\xfe\x00garbage",
    b'{"type": "message"' + b', "x": [' * 5000 + b"]" * 5000 + b"}",
    json.dumps({"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}).encode(),
    b"",
    b"null",
])
def test_pathological_bodies(fuzz_target: tuple[BotProcess, RecordingConnector], body: bytes) -> None:
    bot, _ = fuzz_target
    status, text = post_raw(bot, body)
    assert 400 <= status < 500, f"{status}: {text[:200]}"


def test_invalid_unicode_and_huge_text_in_a_real_conversation(fuzz_target: tuple[BotProcess, RecordingConnector]
                                                              ) -> None:
    bot, conn = fuzz_target
    conv = new_conversation_id("fuzz")
    lone = json.dumps(message("x", conversation_id=conv, service_url=conn.url)).replace('"x"', '"\\ud83d broken"')
    assert_handled(*post_raw(bot, lone.encode()))
    big = message("é" * 100_000, conversation_id=conv, service_url=conn.url)
    status, _ = bot.post_activity(big)
    assert status == 413  # over the documented limit (256 KB)
    ok = message("y" * 20_000, conversation_id=conv, service_url=conn.url)
    assert bot.post_activity(ok)[0] == 201
    conn.wait_for(lambda c: len(c.texts(conv)) >= 1, timeout=20)


def test_the_bot_is_healthy_and_answers_after_the_fuzzing(fuzz_target: tuple[BotProcess, RecordingConnector],
                                                          tmp_path: Path) -> None:
    bot, conn = fuzz_target
    assert bot.alive
    conv = new_conversation_id()
    assert bot.post_activity(message("my name is Ada", conversation_id=conv, service_url=conn.url))[0] == 201
    assert conn.wait_for_texts(1, conv, timeout=15) == ["Nice to meet you, Ada. I'll remember that."]
    assert "Traceback" not in bot.log_tail(100_000)


@pytest.mark.parametrize("entities", [[None], [{"type": "mention"}], [{"type": "mention", "mentioned": "bot-1"}],
                                      [7, "x", {"type": None}]])
def test_odd_entities_do_not_break_a_turn(fuzz_target: tuple[BotProcess, RecordingConnector],
                                          entities: list[Any]) -> None:
    bot, conn = fuzz_target
    conv = new_conversation_id("fuzz")
    activity = message("my name is Ada", conversation_id=conv, service_url=conn.url, conversation_type="groupChat")
    activity["entities"] = entities
    assert bot.post_activity(activity)[0] in (201, 400)
    assert "has no attribute" not in bot.log_tail(100_000)
