"""Data protection on the real app (issue 13, findings 12-14 and the reset part of 7): a reset
really forgets, the data directory is private, stored dialog state cannot run code."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from harness.activities import message, teams_channel_mention
from harness.botproc import BotProcess
from harness.connector import RecordingConnector
from storage.abc import ConversationStore
from tests.e2e.conftest import Launch, StoreProbe
from tests.e2e.test_conversation import say

pytestmark = [pytest.mark.e2e]

FORGOTTEN = "Done: I've forgotten this conversation. Let's start afresh."


def everything_stored(stored: StoreProbe) -> bytes:
    """Every byte the store holds: the raw SQLite files (database, -wal, -shm, the job store), or
    every item of the Cosmos container."""
    if "COSMOS_ENDPOINT" not in stored.env:
        return b"".join(p.read_bytes() for p in sorted(stored.data_dir.iterdir())
                        if p.is_file() and ".sqlite3" in p.name)

    async def dump(store: ConversationStore) -> bytes:
        container: Any = store._container  # type: ignore[attr-defined]
        return json.dumps([item async for item in container.query_items("SELECT * FROM c")]).encode()

    return stored.run(dump)


def dialog_items(stored: StoreProbe, key: str) -> dict[str, Any]:
    async def read(store: ConversationStore) -> dict[str, Any]:
        return await store.read_items([key])

    return stored.run(read)


def post_ignoring_a_crash(bot: BotProcess, activity: dict[str, Any]) -> None:
    """The process may die (a crash point) before it answers."""
    with contextlib.suppress(OSError):
        bot.post_activity(activity)


def wait_until_dead(bot: BotProcess, timeout: float = 15) -> None:
    assert bot.wait_exited(timeout), "the process never reached its crash point"
    assert "crash point" in bot.log_tail()


# --- finding 12: a confirmed reset forgets ---


@pytest.mark.parametrize("crash_at", ["", "reset_committed"])
def test_reset_forgets_what_was_said(launch: Launch, conn: RecordingConnector, conv: str, stored: StoreProbe,
                                     crash_at: str) -> None:
    """After "reset" + "yes" no text said before is left in the store (on SQLite: not in any byte of
    the files), nor the dialog state; redelivery dedupe and a running job survive. With the crash
    point the process dies after committing the reset turn, before forgetting: the restart forgets."""
    marker = f"Quillon{uuid.uuid4().hex[:10]}"
    key, dialog_key = f"emulator:{conv}", f"dialog/emulator/conversations/{conv}"
    bot = launch({"ACTIVATE_LINE_SECONDS": "60", **({"CRASH_AT": crash_at} if crash_at else {})})
    assert isinstance(bot, BotProcess)
    named = say(bot, conn, conv, f"my name is {marker}")
    assert conn.wait_for_texts(1, conv) == [f"Nice to meet you, {marker}. I'll remember that."]
    say(bot, conn, conv, "activate line 555-0199")  # still running at the reset: its job stays
    conn.wait_for_texts(2, conv)
    say(bot, conn, conv, "reset")
    assert "Reset?" in conn.wait_for_texts(3, conv)[2]
    assert dialog_items(stored, dialog_key)  # the pending question is stored
    assert marker.encode() in everything_stored(stored)
    yes = message("yes", conversation_id=conv, service_url=conn.url)
    if crash_at:
        post_ignoring_a_crash(bot, yes)
        wait_until_dead(bot)
        assert marker.encode() in everything_stored(stored)  # committed, not forgotten yet
        bot.extra_env.pop("CRASH_AT")
        bot.start()
    else:
        assert bot.post_activity(yes)[0] == 201
    assert conn.wait_for_texts(4, conv, timeout=20)[3] == FORGOTTEN  # said only once forgotten

    assert marker.encode() not in everything_stored(stored)
    assert dialog_items(stored, dialog_key) == {}
    [job] = stored.jobs(key)
    assert job["status"] in ("queued", "running") and job["arguments"] == {"phone_number": "555-0199"}

    async def reference(store: ConversationStore) -> Any:
        return await store.get_reference(key)

    assert stored.run(reference) is not None  # kept: later replies and the job's result need it
    assert bot.post_activity(named)[0] == 201  # a redelivery of a forgotten message is still a duplicate
    say(bot, conn, conv, "what is my name?")
    assert conn.wait_for_texts(5, conv)[4] == "You haven't told me your name yet."
    time.sleep(0.5)
    assert len(conn.texts(conv)) == 5


# --- finding 7 (last part): a reset in a shared conversation is announced ---


def test_reset_of_a_channel_conversation_names_who_did_it(bot: BotProcess, conn: RecordingConnector,
                                                         conv: str) -> None:
    def post(text: str, user: str) -> None:
        activity = teams_channel_mention(text, conversation_id=conv, service_url=conn.url, user_name=user)
        assert bot.post_activity(activity)[0] == 201

    post("my name is Grace", "Grace Hopper")
    conn.wait_for_texts(1, conv)
    post("reset", "Ada [Lovelace](https://login.micros0ft.example/)")
    conn.wait_for(lambda c: len(c.messages(conv)) >= 2)  # on Teams the question is a card with buttons
    post("yes", "Ada [Lovelace](https://login.micros0ft.example/)")
    announcement = conn.wait_for_texts(2, conv)[1]
    assert announcement == (r"Ada \[Lovelace\]\(https://login\.micros0ft\.example/\) reset this conversation: "
                            "I've forgotten everything said before.")


def test_reset_of_a_personal_chat_is_not_announced_with_a_name(bot: BotProcess, conn: RecordingConnector,
                                                               conv: str) -> None:
    say(bot, conn, conv, "reset")
    conn.wait_for_texts(1, conv)
    say(bot, conn, conv, "yes")
    assert conn.wait_for_texts(2, conv)[1] == FORGOTTEN


# --- finding 14: stored dialog state is data, never code ---


@pytest.mark.parametrize("shape", ["jsonpickle", "json"])
def test_a_code_payload_in_stored_dialog_state_is_not_run(bot: BotProcess, conn: RecordingConnector, conv: str,
                                                          stored: StoreProbe, tmp_path: Path, shape: str) -> None:
    """Whoever can write the store plants a ``py/reduce`` payload (it would create a file); the bot
    reads that dialog state on the next message: nothing runs, the bot answers, reset still works."""
    planted = tmp_path / f"planted-{shape}"
    reduce = {"py/reduce": [{"py/function": "builtins.open"}, {"py/tuple": [str(planted), "w"]}]}
    value = ({"pickled": json.dumps({"DialogState": reduce})} if shape == "jsonpickle"
             else {"format": "dialog-json/1", "state": {"DialogState": reduce}})

    async def plant(store: ConversationStore) -> None:
        await store.write_items({f"dialog/emulator/conversations/{conv}": value})

    stored.run(plant)
    say(bot, conn, conv, "hello there")
    answer = conn.wait_for_texts(1, conv)[0]
    assert not planted.exists(), "the stored payload ran code in the bot"
    assert "offline model" in answer
    assert "ignoring the stored dialog state" in bot.log_tail()
    say(bot, conn, conv, "reset")
    assert "Reset?" in conn.wait_for_texts(2, conv)[1]
    bot.terminate()  # the question is stored in the new format and survives a restart
    bot.start()
    say(bot, conn, conv, "yes")
    assert conn.wait_for_texts(3, conv)[2] == FORGOTTEN
    assert not planted.exists()


# --- finding 13: the data directory is the bot's alone ---


def modes(directory: Path) -> dict[str, str]:
    found = {".": oct(stat.S_IMODE(directory.stat().st_mode))}
    for path in directory.rglob("*"):
        found[str(path.relative_to(directory))] = oct(stat.S_IMODE(path.stat().st_mode))
    return found


@pytest.mark.parametrize("existing", [False, True], ids=["created", "existing-too-open"])
def test_data_directory_is_0700_and_its_files_0600_whatever_the_umask(launch: Launch, conn: RecordingConnector,
                                                                      conv: str, tmp_path: Path,
                                                                      backend: str, existing: bool) -> None:
    """Started with umask 000 and a DATA_DIR that does not exist yet (on Cosmos DB too: the job
    store is SQLite there), or one left too open by an older version."""
    data = tmp_path / "not-yet" / "data"
    if existing:
        data.mkdir(parents=True)
        data.chmod(0o755)
        old = data / ("conversations.sqlite3" if backend == "sqlite" else "jobs.sqlite3")
        old.touch()
        old.chmod(0o644)
    old_umask = os.umask(0)
    try:
        bot = launch({"DATA_DIR": str(data), "ACTIVATE_LINE_SECONDS": "1"})
    finally:
        os.umask(old_umask)
    say(bot, conn, conv, "activate line 555-0100")  # writes the conversation store and the job store
    conn.wait_for(lambda c: any("is active" in t for t in c.texts(conv)), timeout=20)
    found = modes(data)
    expected_files = {"jobs.sqlite3"} | ({"conversations.sqlite3", "conversations.sqlite3-wal",
                                          "conversations.sqlite3-shm"} if backend == "sqlite" else set())
    assert expected_files <= found.keys(), found
    assert found == {name: "0o700" if name == "." else "0o600" for name in found}, found
    if existing:
        assert "changed it to 0700" in bot.log_tail(200)
