"""Outgoing messages within what Teams accepts.

Teams refuses a bot message larger than its size limit with 413 ``MessageSizeTooBig``; the
limit counts the whole activity encoded as UTF-16. Microsoft's documentation has given 28 KB,
40 KB and now 100 KB (80 KB recommended); we keep to the strictest, 28 KB, so a message that
passes here passes on every Teams client and the Bot Framework Emulator.

A long text reply is **split** into up to :data:`MAX_REPLY_PARTS` messages, at paragraph or line
breaks where it can be: a long answer stays readable, in order. Past that it is **clipped**
with a note saying so: a runaway answer (or a tool result relayed verbatim) must not flood the
chat nor fill the conversation's stored outbox.
"""

from __future__ import annotations

import json
from typing import Any

JSONDict = dict[str, Any]

#: The strictest documented Teams limit for one message (bytes of UTF-16).
TEAMS_MESSAGE_BYTES = 28_000
#: Room left for the activity's envelope (type, ids, conversation reference, entities).
_ENVELOPE_BYTES = 4_000
#: The most UTF-16 code units of text in one message.
MAX_TEXT_UNITS = (TEAMS_MESSAGE_BYTES - _ENVELOPE_BYTES) // 2
#: The most messages one reply is split into before the rest is clipped.
MAX_REPLY_PARTS = 4


def utf16_units(text: str) -> int:
    """Length in UTF-16 code units (what Teams counts, two bytes each)."""
    return len(text.encode("utf-16-le")) // 2


def activity_bytes(activity: Any) -> int:
    """The size Teams counts for an activity: its JSON encoded as UTF-16."""
    return 2 * utf16_units(json.dumps(activity, ensure_ascii=False))


def _fit(text: str, units: int) -> int:
    """The longest prefix length of ``text`` that has at most ``units`` UTF-16 code units."""
    if utf16_units(text) <= units:
        return len(text)
    lo, hi = 0, min(len(text), units)
    while lo < hi:  # binary search: surrogate pairs make code units and characters differ
        mid = (lo + hi + 1) // 2
        if utf16_units(text[:mid]) <= units:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_text(text: str, max_units: int = MAX_TEXT_UNITS, max_parts: int = MAX_REPLY_PARTS) -> list[str]:
    """``text`` as messages Teams accepts: split at breaks, at most ``max_parts``, the rest clipped."""
    parts: list[str] = []
    rest = text
    while rest and len(parts) < max_parts:
        end = _fit(rest, max_units)
        if end < len(rest):
            # Prefer a paragraph, then a line, then a word break in the second half of the part.
            for sep in ("\n\n", "\n", " "):
                cut = rest.rfind(sep, end // 2, end)
                if cut > 0:
                    end = cut
                    break
        parts.append(rest[:end])
        rest = rest[end:].lstrip("\n ")
    if rest:
        room = max_units - utf16_units(_clip_note(len(text), len(text)))  # the note's longest form
        parts[-1] = parts[-1][:_fit(parts[-1], room)]
        parts[-1] += _clip_note(sum(len(p) for p in parts), len(text))
    return parts or [text]


def _clip_note(shown: int, total: int) -> str:
    return f"\n\n[clipped: this answer was too long for Teams; {shown} of {total} characters shown]"


# --- what marks a model-written message (Teams: "Enhance AI-generated bot messages") ---
#: The streaming protocol's entity (on the typing chunks and on the final message).
STREAMINFO = "streaminfo"
#: The schema.org Message entity that carries the AI label and the citations.
_AI_ENTITY: JSONDict = {"type": "https://schema.org/Message", "@type": "Message", "@context": "https://schema.org",
              "@id": "", "additionalType": ["AIGeneratedContent"]}


def stream_entity(stream_type: str, *, stream_id: str | None = None, sequence: int | None = None) -> JSONDict:
    """A ``streaminfo`` entity: ``informative`` / ``streaming`` (with a sequence from 1) or ``final``
    (no sequence); every one but the first names the stream the first send returned."""
    entity: JSONDict = {"type": STREAMINFO, "streamType": stream_type}
    if stream_id is not None:
        entity["streamId"] = stream_id
    if sequence is not None:
        entity["streamSequence"] = sequence
    return entity


def ai_message(text: str, *, stream_id: str | None = None, citations: list[JSONDict] | None = None) -> JSONDict:
    """A model-written message: the AI label, the feedback buttons, its citations (already within
    Teams' limits: agent/citations.py) and, when it ends a stream, the ``final`` streaminfo."""
    ai: JSONDict = {**_AI_ENTITY, "additionalType": ["AIGeneratedContent"]}
    if citations:
        ai["citation"] = citations
    entities: list[JSONDict] = [ai]
    if stream_id is not None:
        entities.append(stream_entity("final", stream_id=stream_id))
    return {"type": "message", "text": text, "textFormat": "markdown", "entities": entities,
            "channelData": {"feedbackLoopEnabled": True}}


def closing_message(text: str, stream_id: str) -> JSONDict:
    """A fixed text of the bot's (no AI label) that ends a stream, e.g. when the turn failed."""
    return {"type": "message", "text": text, "textFormat": "markdown",
            "entities": [stream_entity("final", stream_id=stream_id)]}


def is_ai_message(activity: Any) -> bool:
    """Whether an activity carries the AI label (so feedback on it is expected)."""
    return isinstance(activity, dict) and any(
        isinstance(e, dict) and "AIGeneratedContent" in (e.get("additionalType") or ())
        for e in activity.get("entities") or ())


def final_stream_id(activity: Any) -> str | None:
    """The stream a message closes (its ``final`` streaminfo), or None."""
    for entity in (activity.get("entities") or ()) if isinstance(activity, dict) else ():
        if isinstance(entity, dict) and entity.get("type") == STREAMINFO and entity.get("streamType") == "final":
            return str(entity.get("streamId") or "") or None
    return None


def without_stream(activity: JSONDict) -> JSONDict:
    """The same message as a plain one (when Teams refuses to close the stream with it)."""
    plain = dict(activity)
    plain["entities"] = [e for e in activity.get("entities") or () if not (isinstance(e, dict)
                                                                          and e.get("type") == STREAMINFO)]
    return plain
