"""A confirmed reset: what the bot says, and forgetting what was said before (finding 12 of issue 13).

The reset turn is committed first (agent state cleared, the confirmation in the outbox); the
conversation's old texts are forgotten in the store (:meth:`ConversationStore.forget_conversation`)
before that confirmation is sent. A crash in between leaves the confirmation in the outbox, so
the flush after the restart forgets again (it is idempotent) before it says "I've forgotten".
"""

from __future__ import annotations

import logging
import re
from typing import Any

from runtime.crashpoints import crash_point
from runtime.protocol import Requester, is_reset_reply, replied_event_id
from storage.abc import JSON, ConversationRecord, ConversationStore

log = logging.getLogger(__name__)

_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~])")


def reset_payload(by: Requester, dialog_items: list[str]) -> JSON:
    """The reset event's payload: who reset (announced in shared conversations) and the
    key/value items (dialog state) to delete with the rest."""
    return {"by": by.to_json(), "forget_items": dialog_items}


def reset_confirmation(payload: JSON) -> str:
    """In a group chat or channel everyone sees the bot forget, so it says who asked."""
    by = Requester.from_json(payload.get("by"))
    if by.shared_conversation:
        name = _MARKDOWN.sub(r"\\\1", " ".join(by.label.split()))  # a display name is not markup
        return f"{name} reset this conversation: I've forgotten everything said before."
    return "Done: I've forgotten this conversation. Let's start afresh."


class Forgetter:
    """Runs the store's forgetting for each reset confirmation waiting in an outbox, once per
    message and process (again after a restart: it is idempotent)."""

    def __init__(self, store: ConversationStore) -> None:
        self._store = store
        self._done: dict[str, set[str]] = {}  # conversation key -> confirmations already forgotten for

    async def before_sending(self, record: ConversationRecord) -> None:
        waiting = {m.id for m in record.outbox if is_reset_reply(m.id)}
        done = self._done.pop(record.key, set()) & waiting
        for message_id in sorted(waiting - done):
            crash_point("reset_committed")
            event_id = replied_event_id(message_id)
            event = await self._store.get_event(record.key, event_id) if event_id is not None else None
            items: Any = event.payload.get("forget_items") if event is not None else None
            item_keys = [k for k in items if isinstance(k, str)] if isinstance(items, list) else []
            changed = await self._store.forget_conversation(record.key, item_keys=item_keys)
            log.info("reset of %s: forgot %d stored entr%s", record.key, changed, "y" if changed == 1 else "ies")
            done.add(message_id)
        if done:
            self._done[record.key] = done
