"""Dialog state as plain JSON: what the reset dialog stores round-trips; nothing else is built."""

from __future__ import annotations

import json
import logging

import pytest
from botbuilder.core import ConversationState, MessageFactory, TurnContext
from botbuilder.core.adapters import TestAdapter
from botbuilder.dialogs import DialogInstance, DialogState
from botbuilder.dialogs.prompts import PromptOptions

from bot.dialog_storage import FORMAT, ConversationStoreStorage, DialogStateError, decode, dialog_item_key, encode
from dialogs.commands import CommandDialogs
from storage.memory import MemoryStore


def _prompt_state() -> DialogState:
    options = PromptOptions(prompt=MessageFactory.text("Reset?"), retry_prompt=MessageFactory.text("yes or no"))
    confirm = DialogInstance(id="confirm", state={"options": options, "state": {}})
    steps = DialogInstance(id="steps", state={"options": None, "values": {"$type": "user data"}, "stepIndex": 0})
    return DialogState([DialogInstance(id="reset", state={"dialogs": DialogState([confirm, steps])})])


def test_reset_dialog_state_round_trips_through_plain_json() -> None:
    stored = json.loads(json.dumps(encode({"DialogState": _prompt_state()})))
    state = decode(stored)["DialogState"]
    [reset] = state.dialog_stack
    confirm, steps = reset.state["dialogs"].dialog_stack
    options = confirm.state["options"]
    assert isinstance(options, PromptOptions)
    assert (options.prompt.text, options.retry_prompt.text, options.number_of_attempts) == ("Reset?", "yes or no", 0)
    assert steps.state["values"] == {"$type": "user data"}  # a plain dict with the marker key stays a dict


@pytest.mark.parametrize("payload", [
    {"$type": "os.system", "command": "true"},
    {"$type": "DialogState", "dialog_stack": [{"py/object": "os.system"}]},
    {"$type": "DialogInstance", "id": 1, "state": {}},
    {"$type": "PromptOptions", "style": "__class__", "number_of_attempts": 0},
])
def test_anything_the_codec_did_not_write_is_refused(payload: object) -> None:
    with pytest.raises(DialogStateError):
        decode(payload)


def test_py_keys_are_plain_data() -> None:
    payload = {"py/reduce": [{"py/function": "os.system"}, {"py/tuple": ["true"]}]}
    assert decode(payload) == payload


def test_unknown_classes_are_not_encoded() -> None:
    with pytest.raises(TypeError, match="object"):
        encode({"x": object()})


async def test_old_and_hostile_items_read_as_no_dialog_state(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    storage = ConversationStoreStorage(store)
    await store.write_items({
        "dialog/old": {"pickled": '{"py/reduce": [{"py/function": "os.system"}, {"py/tuple": ["true"]}]}'},
        "dialog/shape": {"format": FORMAT, "state": {"DialogState": {"py/object": "os.system"}}},
    })
    await storage.write({"good": {"DialogState": _prompt_state()}})
    with caplog.at_level(logging.WARNING):
        found = await storage.read(["old", "shape", "good"])
    assert list(found) == ["good"]
    assert "ignoring the stored dialog state dialog/old" in caplog.text


async def test_dialog_item_key_is_where_conversation_state_writes() -> None:
    store = MemoryStore()
    state = ConversationState(ConversationStoreStorage(store))
    seen: list[str] = []

    async def never(_: TurnContext) -> None:
        raise AssertionError("no reset")

    commands = CommandDialogs(state, lambda: "help", never,
                              list_jobs=None, cancel_job=None, jobs_card=None)  # type: ignore[arg-type]

    async def logic(turn_context: TurnContext) -> None:
        await commands.handle(turn_context, turn_context.activity.text)
        seen.append(dialog_item_key(turn_context.activity))

    await TestAdapter(logic).send("reset")
    assert list(store._items) == seen


@pytest.mark.parametrize("hostile_first", [False, True])
async def test_a_sole_writer_reads_a_conversation_once_and_remembers_what_it_stored(hostile_first: bool) -> None:
    """ROLE=all without PostgreSQL: after the first read, reads come from what this process stored
    (an item it never read costs one read, a deleted one none), still decoded, so a hostile
    stored value stays refused."""
    store = MemoryStore()
    reads: list[list[str]] = []
    read_items = store.read_items

    async def counted(keys):  # type: ignore[no-untyped-def]
        keys = list(keys)
        reads.append(keys)
        return await read_items(keys)

    store.read_items = counted  # type: ignore[method-assign]
    if hostile_first:
        await store.write_items({"dialog/c": {"format": FORMAT, "state": {"DialogState": {"py/object": "os.system"}}}})
    storage = ConversationStoreStorage(store, sole_writer=True)
    assert await storage.read(["c"]) == {}
    assert await storage.read(["c"]) == {}
    await storage.write({"c": {"DialogState": _prompt_state()}})
    assert isinstance((await storage.read(["c"]))["c"]["DialogState"], DialogState)
    await storage.delete(["c"])
    assert await storage.read(["c"]) == {} and await store.read_items(["dialog/c"]) == {}
    assert reads == [["dialog/c"], ["dialog/c"]]  # the first read, and the check just above
    plain = ConversationStoreStorage(store)
    await plain.read(["c"])
    await plain.read(["c"])
    assert len(reads) == 4  # without sole_writer every read goes to the store
