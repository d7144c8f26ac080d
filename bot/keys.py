"""How a Bot Framework conversation maps to a store key."""

from __future__ import annotations

from botbuilder.schema import Activity

from runtime import protocol


def conversation_key(activity: Activity) -> str:
    """The activity's conversation as a store key (:func:`runtime.protocol.conversation_key`)."""
    return protocol.conversation_key(activity.channel_id, activity.conversation.id)
