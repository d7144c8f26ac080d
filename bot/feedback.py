"""Feedback on model-written messages: the thumbs up / down Teams shows under an AI-labelled answer.

Teams sends an ``invoke`` named ``message/submitAction`` with ``value`` ``{"actionName":
"feedback", "actionValue": {"reaction": "like" | "dislike", "feedback": "<JSON text with
feedbackText>"}}`` and ``replyToId``, the message it is about. It is answered 200 once stored.

Stored in the store's key/value items, with the message it is about:

* ``feedback-msg/<conversation key>/<message id>``: written when a model-written message went out to Teams
  (:meth:`Feedback.message_sent`, through ``bot.streaming.FinalMessages``), so feedback on a
  message the bot never sent is refused (404) and stores nothing (feedback naming no message, as
  the Agents Playground sends it, is kept with ``message_id`` null);
* ``feedback/<conversation key>``: the conversation's feedback, one entry per (message, person), the
  latest :data:`MAX_ENTRIES` kept: reaction, the comment (clipped to :data:`MAX_COMMENT_CHARS`,
  control characters removed), who (from the authenticated activity: ``from.aadObjectId``, id,
  name) and when. A reset forgets it with the rest of the conversation; retention expires it.

An operator reads it at ``GET /feedback?conversation=<key>`` on the ops endpoints (behind
OPS_TOKEN like ``/metrics``); ``teams_agent_feedback_total`` counts it by reaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Collection
from typing import Any

from aiohttp import web

from runtime import metrics
from runtime.protocol import JSON, Requester, conversation_key
from storage.abc import ItemStore

log = logging.getLogger(__name__)

SUBMIT_ACTION = "message/submitAction"
REACTIONS = ("like", "dislike")
MAX_COMMENT_CHARS = 1000
MAX_ENTRIES = 200
_SENT_PREFIX = "feedback-msg/"
_PREFIX = "feedback/"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u202a-\u202e\u2066-\u2069]")


def feedback_item_key(key: str) -> str:
    """The item holding a conversation's feedback (a reset forgets it)."""
    return f"{_PREFIX}{key}"


def _sent_key(key: str, message_id: str) -> str:
    return f"{_SENT_PREFIX}{key}/{message_id}"


class FeedbackError(ValueError):
    """A feedback invoke that cannot be stored; ``status`` is the invoke response's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_feedback(value: Any) -> tuple[str, str]:
    """(reaction, comment) from the invoke's ``value``; raises FeedbackError(400) for anything else."""
    if not isinstance(value, dict) or value.get("actionName") != "feedback":
        raise FeedbackError(400, "not a feedback action")
    action = value.get("actionValue")
    if not isinstance(action, dict) or action.get("reaction") not in REACTIONS:
        raise FeedbackError(400, "the reaction must be like or dislike")
    comment: Any = action.get("feedback") or ""
    if isinstance(comment, str) and comment.strip().startswith("{"):
        with contextlib.suppress(ValueError):  # Teams sends the form as JSON text: {"feedbackText": "..."}
            comment = json.loads(comment)  # the edge bounds the body
    if isinstance(comment, dict):
        comment = comment.get("feedbackText") or ""
    if not isinstance(comment, str):
        raise FeedbackError(400, "the feedback text must be a string")
    comment = _CONTROL.sub("", comment).strip()
    if len(comment) > MAX_COMMENT_CHARS:
        comment = comment[:MAX_COMMENT_CHARS] + "…"
    return str(action["reaction"]), comment


class Feedback:
    """Stores feedback (the invoke, on the web half) and the ids of messages it may be about (the
    outbox's sends, on the worker)."""

    def __init__(self, items: ItemStore) -> None:
        self._items = items
        self._locks: dict[str, asyncio.Lock] = {}

    async def message_sent(self, reference: JSON, message_ids: Collection[str]) -> None:
        """A model-written message went out under these ids (a streamed one: also its stream id)."""
        key = conversation_key(reference.get("channelId"), (reference.get("conversation") or {}).get("id"))
        now = time.time()
        await self._items.write_items({_sent_key(key, message_id): {"at": now} for message_id in message_ids})

    async def submit(self, key: str, reply_to_id: str | None, value: Any, by: Requester) -> None:
        """Store one person's feedback on one message. Raises FeedbackError (nothing stored)."""
        try:
            reaction, comment = parse_feedback(value)
        except FeedbackError:
            metrics.FEEDBACK.labels("malformed").inc()
            raise
        if reply_to_id is not None and len(reply_to_id) > 200:
            metrics.FEEDBACK.labels("malformed").inc()
            raise FeedbackError(400, "replyToId is not a message id")
        if reply_to_id:  # Teams names the message; the Agents Playground (0.2.28) does not: kept without one
            sent = _sent_key(key, reply_to_id)
            if not (await self._items.read_items([sent])).get(sent):
                metrics.FEEDBACK.labels("unknown_message").inc()
                raise FeedbackError(404, "there is no answer of mine with that id in this conversation")
        who = by.aad_object_id or by.id
        entry = {"message_id": reply_to_id or None, "reaction": reaction, "comment": comment, "at": time.time(),
                 "by": {"aadObjectId": by.aad_object_id, "id": by.id, "name": by.name}}
        item = feedback_item_key(key)
        async with self._locks.setdefault(key, asyncio.Lock()):  # one read-modify-write at a time here
            stored = (await self._items.read_items([item])).get(item) or {}
            entries = [e for e in stored.get("entries") or () if isinstance(e, dict)
                       and not (e.get("message_id") == reply_to_id
                                and (e.get("by") or {}).get("aadObjectId" if by.aad_object_id else "id") == who)]
            entries = [*entries, entry][-MAX_ENTRIES:]  # a person's later click replaces their earlier one
            await self._items.write_items({item: {"conversation": key, "entries": entries}})
        metrics.FEEDBACK.labels(reaction).inc()
        log.info("feedback in %s on message %s: %s%s", key, reply_to_id, reaction, " with a comment" if comment else "")

    async def read(self, key: str) -> list[JSON]:
        item = feedback_item_key(key)
        stored = (await self._items.read_items([item])).get(item) or {}
        return list(stored.get("entries") or ())

    async def endpoint(self, request: web.Request) -> web.Response:
        """``GET /feedback?conversation=<key>`` (an ops endpoint): that conversation's feedback."""
        key = request.query.get("conversation", "")
        if not key or len(key) > 1000:
            return web.json_response({"error": "bad_request", "details": ["give ?conversation=<conversation key>, "
                                                                          "e.g. msteams:a:1xyz"]}, status=400)
        return web.json_response({"conversation": key, "feedback": await self.read(key)})
