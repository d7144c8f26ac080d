"""Posting to a conversation's inbox: append the event, then wake whoever processes it if it is new.

The one place that pairs the two steps of the durability protocol's ingest (the edge's messages,
commands, welcomes and resets; the jobs' "finished" events). The event's id makes a repeat a
no-op, and a repeat wakes nobody: the first post already did.
"""

from __future__ import annotations

from collections.abc import Callable

from storage.abc import ConversationStore, InboxEvent

Wake = Callable[[str], None]


class Inbox:
    def __init__(self, store: ConversationStore, wake: Wake) -> None:
        """``wake(key)``: the edge passes the coordinator's (it reaches the active worker wherever it
        runs); the jobs, which run on the active worker, pass the worker's own."""
        self._store = store
        self._wake = wake

    async def post(self, key: str, event: InboxEvent) -> bool:
        """Append ``event`` to ``key``'s inbox and wake its processor; False (and no wake-up) if it was there."""
        if not await self._store.append_event(key, event):
            return False
        self._wake(key)
        return True
