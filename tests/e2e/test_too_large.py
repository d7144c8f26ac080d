"""A turn too large to store is a permanent failure of that turn, not a conversation blocked for good
(issue 13, finding 11): on SQLite and on Cosmos DB (the wire server), with the store's item cap lowered
so a real turn exceeds it. The user is told; the next message is answered."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.processor import TOO_LARGE_TO_STORE
from harness.botproc import BotProcess
from harness.connector import RecordingConnector
from tests.e2e.conftest import StoreProbe
from tests.e2e.test_conversation import say
from tests.e2e.test_untrusted_content import huge_server

pytestmark = pytest.mark.e2e


@pytest.fixture
def bot_env(tmp_path: Path) -> dict[str, str]:
    # 20,000 characters of tool output relayed: two messages in the outbox, over a 16 KB item cap.
    return {**huge_server(tmp_path), "STORE_MAX_ITEM_BYTES": "16384", "MAX_TOOL_RESULT_CHARS": "20000"}


def test_a_turn_too_large_to_store_is_dropped_and_the_conversation_goes_on(bot: BotProcess, conn: RecordingConnector,
                                                                          conv: str, stored: StoreProbe) -> None:
    say(bot, conn, conv, "my name is Ada")
    assert conn.wait_for_texts(1, conv) == ["Nice to meet you, Ada. I'll remember that."]
    say(bot, conn, conv, "run huge")
    assert conn.wait_for_texts(2, conv, timeout=30)[1] == TOO_LARGE_TO_STORE
    say(bot, conn, conv, "what is my name?")
    assert conn.wait_for_texts(3, conv, timeout=15)[2] == "Your name is Ada."
    assert len(conn.texts(conv)) == 3  # the dropped turn was not retried
    assert "too large to store" in bot.log_tail(400)
