"""botbuilder ``Storage`` over our ConversationStore, so dialog state is as durable as the rest.

Dialog state holds botbuilder objects (DialogState, DialogInstance, PromptOptions, Activity).
botbuilder's own storages encode them with jsonpickle, whose decoder builds whatever class a
stored ``py/object`` names and calls whatever ``py/reduce`` names (``safe=True`` in the pinned
3.4 does not stop either): whoever can write the store could run code in the bot. Here they are
plain JSON instead, through an explicit codec for exactly those classes; decoding constructs
nothing else (a ``py/...`` key is just a key of a plain dict). A stored value in any other
format (the jsonpickle one of earlier versions included) is refused with a warning and read
as no dialog state: a pending "are you sure?" is lost, the user asks again.
"""

from __future__ import annotations

import logging
from typing import Any

from botbuilder.core import Storage
from botbuilder.dialogs import DialogInstance, DialogState
from botbuilder.dialogs.choices import ListStyle
from botbuilder.dialogs.prompts import PromptOptions
from botbuilder.schema import Activity

from storage.abc import JSON, ItemStore

log = logging.getLogger(__name__)

DIALOG_PREFIX = "dialog/"
FORMAT = "dialog-json/1"
_TYPE = "$type"  # marks an encoded botbuilder object; a plain dict with this key is wrapped


class DialogStateError(ValueError):
    """A stored dialog state this codec refuses to decode."""


def dialog_item_key(activity: Activity, prefix: str = DIALOG_PREFIX) -> str:
    """The store key of a conversation's dialog state: botbuilder's ``ConversationState`` key
    (``<channel>/conversations/<conversation id>``) under this storage's prefix."""
    return f"{prefix}{activity.channel_id}/conversations/{activity.conversation.id}"


def encode(value: Any) -> Any:
    """Dialog state as plain JSON; raises TypeError for a class the codec does not know."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("dialog state has a dict with non-string keys")
        items = {k: encode(v) for k, v in value.items()}
        return {_TYPE: "dict", "items": items} if _TYPE in value else items
    if isinstance(value, DialogState):
        return {_TYPE: "DialogState", "dialog_stack": encode(value.dialog_stack)}
    if isinstance(value, DialogInstance):
        return {_TYPE: "DialogInstance", "id": value.id, "state": encode(value.state)}
    if isinstance(value, PromptOptions):
        if value.choices:
            raise TypeError("PromptOptions.choices are not supported by this dialog storage")
        return {_TYPE: "PromptOptions", "prompt": encode(value.prompt), "retry_prompt": encode(value.retry_prompt),
                "style": value.style.name if value.style is not None else None,
                "validations": encode(value.validations), "number_of_attempts": value.number_of_attempts}
    if isinstance(value, Activity):
        return {_TYPE: "Activity", "activity": value.serialize()}
    raise TypeError(f"dialog state holds a {type(value).__name__}, which this storage cannot store as JSON")


def decode(data: Any) -> Any:
    """The inverse of :func:`encode`; raises DialogStateError for anything it did not write."""
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        raise DialogStateError(f"unexpected {type(data).__name__}")
    kind = data.get(_TYPE)
    if kind is None:
        return {k: decode(v) for k, v in data.items()}
    if kind == "dict":
        return {k: decode(v) for k, v in _field(data, "items", dict).items()}
    if kind == "DialogState":
        stack = [decode(v) for v in _field(data, "dialog_stack", list)]
        if not all(isinstance(i, DialogInstance) for i in stack):
            raise DialogStateError("a dialog stack holds something other than dialog instances")
        return DialogState(stack)
    if kind == "DialogInstance":
        return DialogInstance(id=_field(data, "id", str), state=decode(_field(data, "state", dict)))
    if kind == "PromptOptions":
        style = data.get("style")
        if style is not None and (not isinstance(style, str) or style not in ListStyle.__members__):
            raise DialogStateError(f"unknown list style {style!r}")
        prompt, retry_prompt = decode(data.get("prompt")), decode(data.get("retry_prompt"))
        if not all(p is None or isinstance(p, Activity) for p in (prompt, retry_prompt)):
            raise DialogStateError("a prompt is not an activity")
        return PromptOptions(prompt=prompt, retry_prompt=retry_prompt,
                             style=ListStyle[style] if style is not None else None,
                             validations=decode(data.get("validations")),
                             number_of_attempts=_field(data, "number_of_attempts", int))
    if kind == "Activity":
        # msrest builds an Activity and the botbuilder.schema models it declares, nothing else.
        return Activity.deserialize(_field(data, "activity", dict))
    raise DialogStateError(f"unknown type {kind!r}")


def _field(data: JSON, name: str, kind: type[Any]) -> Any:
    value = data.get(name)
    if not isinstance(value, kind):
        raise DialogStateError(f"{data.get(_TYPE)}.{name} is not a {kind.__name__}")
    return value


#: Conversations whose stored dialog state a sole writer remembers; past this many it starts over.
MAX_REMEMBERED = 10_000


class ConversationStoreStorage(Storage):
    """Dialog state in the store's key/value items, as ``{"format": "dialog-json/1", "state": ...}``.

    ``sole_writer``: this process is the only one taking messages in for the store (``ROLE=all``
    without PostgreSQL), so every dialog state write and delete passes here; it then remembers what
    it stored (mostly: nothing) and reads the store only for a conversation it has not seen since it
    started. Every message asks for its conversation's dialog state (a pending "are you sure?" is
    answered or ended by it), so this is one store round trip less per message.
    """

    def __init__(self, store: ItemStore, prefix: str = DIALOG_PREFIX, *, sole_writer: bool = False) -> None:
        self._store = store
        self._prefix = prefix
        self._sole_writer = sole_writer
        self._stored: dict[str, Any] = {}  # item key -> the stored value (None: none), if sole_writer

    def _remember(self, values: dict[str, Any]) -> None:
        if self._sole_writer:
            if len(self._stored) + len(values) > MAX_REMEMBERED:
                self._stored.clear()
            self._stored.update(values)

    async def read(self, keys: list[str]) -> dict[str, Any]:
        item_keys = [self._prefix + k for k in keys]
        items = {k: self._stored[k] for k in item_keys if k in self._stored and self._stored[k] is not None}
        if missing := [k for k in item_keys if k not in self._stored]:
            read = await self._store.read_items(missing)
            self._remember({k: read.get(k) for k in missing})
            items.update(read)
        found: dict[str, Any] = {}
        for item_key, value in items.items():
            try:
                if not isinstance(value, dict) or value.get("format") != FORMAT:
                    raise DialogStateError("not in the dialog-json/1 format (an older jsonpickle one is never "
                                           "decoded: it could run code)")
                state = decode(value.get("state"))
                if not isinstance(state, dict) or not isinstance(state.get("DialogState", DialogState()), DialogState):
                    raise DialogStateError("not a conversation state with a dialog stack")
                found[item_key[len(self._prefix):]] = state
            except (DialogStateError, ValueError, TypeError, AttributeError) as exc:
                log.warning("ignoring the stored dialog state %s: %s", item_key, exc)
        return found

    async def write(self, changes: dict[str, Any]) -> None:
        if changes:
            values = {self._prefix + k: {"format": FORMAT, "state": encode(v)} for k, v in changes.items()}
            self._forget(values)  # if the write fails, read again
            await self._store.write_items(values)
            self._remember(values)

    async def delete(self, keys: list[str]) -> None:
        item_keys = [self._prefix + k for k in keys]
        self._forget(item_keys)
        await self._store.delete_items(item_keys)
        self._remember(dict.fromkeys(item_keys))

    def _forget(self, item_keys: Any) -> None:
        for k in item_keys:
            self._stored.pop(k, None)
