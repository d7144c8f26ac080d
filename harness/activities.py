"""Builders for incoming activities as the Emulator / Microsoft Teams send them.

Plain dicts in Bot Framework wire JSON (camelCase) so tests exercise the app's
real deserialisation path when posted to ``/api/messages``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "conversation_update",
    "message",
    "new_conversation_id",
    "teams_channel_mention",
]

Activity = dict[str, Any]

#: Channel data Teams attaches to channel messages.
TEAMS_CHANNEL_DATA: dict[str, Any] = {
    "tenant": {"id": "tenant-1"},
    "team": {"id": "team-1"},
    "channel": {"id": "19:channel@thread.skype"},
}

_GROUP_TYPES = frozenset({"groupChat", "channel"})


def new_conversation_id(prefix: str = "conv") -> str:
    """Unique conversation id, so tests never see each other's state."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _timestamp() -> str:
    """Current time the way the channel service formats it (ISO 8601, ``Z``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _conversation(conversation_id: str, conversation_type: str) -> dict[str, Any]:
    conversation: dict[str, Any] = {
        "id": conversation_id,
        "conversationType": conversation_type,
    }
    if conversation_type in _GROUP_TYPES:
        conversation["isGroup"] = True
    return conversation


def _base(
    activity_type: str,
    *,
    conversation_id: str,
    service_url: str,
    activity_id: str | None,
    user_id: str,
    user_name: str,
    bot_id: str,
    bot_name: str,
    channel_id: str,
    conversation_type: str,
) -> Activity:
    """Fields every incoming activity carries."""
    return {
        "type": activity_type,
        "id": activity_id if activity_id is not None else str(uuid.uuid4()),
        "timestamp": _timestamp(),
        "serviceUrl": service_url,
        "channelId": channel_id,
        "from": {"id": user_id, "name": user_name},
        "recipient": {"id": bot_id, "name": bot_name},
        "conversation": _conversation(conversation_id, conversation_type),
    }


def message(
    text: str,
    *,
    conversation_id: str,
    service_url: str,
    activity_id: str | None = None,
    user_id: str = "user-1",
    user_name: str = "Ada",
    bot_id: str = "bot-1",
    bot_name: str = "Bot",
    channel_id: str = "emulator",
    conversation_type: str = "personal",
    entities: list[dict[str, Any]] | None = None,
    channel_data: dict[str, Any] | None = None,
    reply_to_id: str | None = None,
) -> Activity:
    """A user's ``message`` activity; optional fields are omitted when None."""
    activity = _base(
        "message",
        conversation_id=conversation_id,
        service_url=service_url,
        activity_id=activity_id,
        user_id=user_id,
        user_name=user_name,
        bot_id=bot_id,
        bot_name=bot_name,
        channel_id=channel_id,
        conversation_type=conversation_type,
    )
    activity.update({"text": text, "textFormat": "plain", "locale": "en-US"})
    if entities is not None:
        activity["entities"] = entities
    if channel_data is not None:
        activity["channelData"] = channel_data
    if reply_to_id is not None:
        activity["replyToId"] = reply_to_id
    return activity


def teams_channel_mention(
    text: str, *, bot_id: str = "bot-1", bot_name: str = "Bot", **kwargs: Any
) -> Activity:
    """A Teams channel message @-mentioning the bot (``<at>Bot</at> text``).

    ``kwargs`` go to :func:`message` (``conversation_id`` and ``service_url``
    are required); extra ``entities`` are appended after the mention.
    """
    mention_text = f"<at>{bot_name}</at>"
    mention = {
        "type": "mention",
        "mentioned": {"id": bot_id, "name": bot_name},
        "text": mention_text,
    }
    kwargs.setdefault("channel_id", "msteams")
    kwargs.setdefault("conversation_type", "channel")
    kwargs.setdefault(
        "channel_data", {k: dict(v) for k, v in TEAMS_CHANNEL_DATA.items()}
    )
    kwargs["entities"] = [mention, *(kwargs.get("entities") or [])]
    return message(f"{mention_text} {text}", bot_id=bot_id, bot_name=bot_name, **kwargs)


def conversation_update(
    *,
    members_added: list[str],
    conversation_id: str,
    service_url: str,
    bot_id: str = "bot-1",
    bot_name: str = "Bot",
    channel_id: str = "emulator",
    activity_id: str | None = None,
    user_id: str = "user-1",
    user_name: str = "Ada",
    conversation_type: str = "personal",
) -> Activity:
    """``conversationUpdate`` announcing ``members_added`` (include bot_id for install)."""
    activity = _base(
        "conversationUpdate",
        conversation_id=conversation_id,
        service_url=service_url,
        activity_id=activity_id,
        user_id=user_id,
        user_name=user_name,
        bot_id=bot_id,
        bot_name=bot_name,
        channel_id=channel_id,
        conversation_type=conversation_type,
    )
    activity["membersAdded"] = [{"id": member} for member in members_added]
    return activity
