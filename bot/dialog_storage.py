"""botbuilder ``Storage`` over our ConversationStore, so dialog state is as durable as the rest."""

from __future__ import annotations

from typing import Any

import jsonpickle
from botbuilder.core import Storage

from storage.abc import ConversationStore


class ConversationStoreStorage(Storage):
    """Dialog state holds botbuilder objects (DialogState, PromptOptions, Activity), so values are
    encoded with jsonpickle, as botbuilder's own Azure storages do. Only this bot writes them."""

    def __init__(self, store: ConversationStore, prefix: str = "dialog/") -> None:
        self._store = store
        self._prefix = prefix

    async def read(self, keys: list[str]) -> dict[str, Any]:
        items = await self._store.read_items(self._prefix + k for k in keys)
        return {k[len(self._prefix):]: jsonpickle.decode(v["pickled"], keys=True) for k, v in items.items()}

    async def write(self, changes: dict[str, Any]) -> None:
        if changes:
            await self._store.write_items(
                {self._prefix + k: {"pickled": jsonpickle.encode(v, keys=True)} for k, v in changes.items()})

    async def delete(self, keys: list[str]) -> None:
        await self._store.delete_items(self._prefix + k for k in keys)
