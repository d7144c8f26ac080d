"""How a Bot Framework conversation maps to a store key."""

from __future__ import annotations

from botbuilder.schema import Activity


def conversation_key(activity: Activity) -> str:
    """Unique across channels: the same conversation id could exist on two channels.

    A Teams channel thread (``19:...@thread.tacv2;messageid=...``) is its own conversation.
    """
    return f"{activity.channel_id}:{activity.conversation.id}"
