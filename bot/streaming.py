"""The Teams streaming protocol: a reply shown while its turn runs (msteams-docs ``bots/streaming-ux``).

A stream is a series of ``typing`` activities with a ``streaminfo`` entity: ``informative`` updates
(a progress line, "Thinking…", "Starting <tool>…") until the answer starts, then ``streaming``
chunks, each the whole text so far; ``streamSequence`` counts them from 1, and every send but the
first names the ``streamId`` the first send returned. A ``message`` with a ``final`` streaminfo
(no sequence) ends it: that one is the turn's reply and leaves through the outbox like any other
(agent/processor.py), so the answer is exactly as durable as an unstreamed one.

Teams allows about one send per second per stream and refuses a stream that runs longer than two
minutes. So :class:`TeamsStream` keeps only the latest text, sends it at most every ``interval``
seconds, and the next send only after the previous one was accepted. A 429 (after the sender's own
retries) waits and sends the latest text. A 403 (``ContentStreamNotAllowed``: not allowed here, or
the user pressed Stop) or another permanent error ends the stream: the final message is then sent
plain, a new complete message. Text larger than one message is not streamed further (the final
message carries it, split). At ``max_seconds`` (before Teams' two minutes) the stream is closed
with the text shown so far and the turn's reply carries the rest.

Only one-on-one Teams chats stream (:meth:`TeamsReplyStreams.streams_to`); group chats and
channels keep the typing indicator and one final message.

Durability: the stream id is handed to ``on_started`` (the processor records it on the inbox event)
before the first text chunk. After a crash the re-run turn closes that stream with its final
message; :class:`FinalMessages` sends it plain if Teams refuses (the stream expired or ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from agent.outgoing import MAX_TEXT_UNITS, ai_message, final_stream_id, stream_entity, utf16_units, without_stream
from runtime import metrics
from runtime.crashpoints import crash_point
from runtime.protocol import JSON, DeliveryError, MessageSender, StreamOutcome, StreamStarted

log = logging.getLogger(__name__)

#: What the first informative update says until the agent says what it does.
THINKING = "Thinking…"
#: Teams refuses an informative update longer than this.
MAX_INFORMATIVE_CHARS = 1000
#: Teams ends a stream after two minutes; close it a little before.
MAX_STREAM_SECONDS = 110.0
#: Seconds between two sends of one stream (Teams throttles faster streams).
STREAM_INTERVAL = 1.0
#: Marks where a stream closed early (its time limit) and where the next message goes on.
CONTINUED = " …"


def is_personal_teams_chat(reference: JSON) -> bool:
    conversation = reference.get("conversation") or {}
    return reference.get("channelId") == "msteams" and conversation.get("conversationType") == "personal"


class TeamsStream:
    """One reply's stream (implements ``runtime.protocol.ReplyStream``); see the module docstring."""

    def __init__(self, sender: MessageSender, reference: JSON, on_started: StreamStarted, *, first_delay: float,
                 interval: float, max_seconds: float, on_not_allowed: Callable[[], None] | None = None) -> None:
        self._on_not_allowed = on_not_allowed  # the very first send was refused: streaming is off there
        self._sender = sender
        self._reference = reference
        self._on_started = on_started
        self._first_delay = first_delay
        self._interval = interval
        self._max_seconds = max_seconds
        self._informative = THINKING
        self._text = ""
        self._sent_informative: str | None = None
        self._sent_text = ""
        self._sequence = 0  # of the last accepted send
        self._stream_id: str | None = None
        self._ended = False  # refused, failed or closed early: nothing more is sent
        self._shown = ""  # what an early close showed
        self._finished = asyncio.Event()
        self._task = asyncio.create_task(self._pump())

    # --- what the turn says (never blocks) ---
    def informative(self, text: str) -> None:
        self._informative = text[:MAX_INFORMATIVE_CHARS]

    def text(self, so_far: str) -> None:
        if so_far.startswith(self._text):  # Teams wants every chunk to extend the one before
            self._text = so_far

    async def finish(self) -> StreamOutcome:
        self._finished.set()
        try:
            await self._task
        except Exception:  # pragma: no cover - _pump catches its own; the reply must still go out
            log.exception("the reply stream failed")
            self._ended = True
        if self._shown:
            return StreamOutcome(shown=self._shown)
        return StreamOutcome(stream_id=None if self._ended else self._stream_id)

    # --- sending, at the channel's pace ---
    async def _pump(self) -> None:
        if await self._wait(self._first_delay):
            return  # a fast turn streams nothing: its reply alone is sent
        opened = time.monotonic()
        while not self._ended:
            if self._stream_id is not None and time.monotonic() - opened >= self._max_seconds:
                await self._close_early()
                return
            pause = self._interval
            activity = self._next()
            if activity is not None:
                pause = await self._send(activity)
            if self._ended or await self._wait(pause):
                return

    async def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the turn finishes first; True if it did."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._finished.wait(), seconds)
        return self._finished.is_set()

    def _next(self) -> JSON | None:
        """The next typing activity, or None if nothing changed (or nothing more fits one message)."""
        sequence = self._sequence + 1
        if self._stream_id is not None and self._text:  # the first send is always informative: it opens the stream
            if self._text == self._sent_text or utf16_units(self._text) > MAX_TEXT_UNITS:
                return None
            kind, text = "streaming", self._text
        elif not self._sent_text and self._informative != self._sent_informative:
            kind, text = "informative", self._informative
        else:
            return None
        return {"type": "typing", "text": text,
                "entities": [stream_entity(kind, stream_id=self._stream_id, sequence=sequence)]}

    async def _send(self, activity: JSON) -> float:
        """Send one update; returns how long to wait before the next one."""
        try:
            sent_id = await self._sender.send(self._reference, activity)
        except DeliveryError as exc:
            if exc.permanent:  # 403 ContentStreamNotAllowed (or Stop), 400 ...: the final message goes plain
                log.info("Teams ended the reply stream %s: %s; the answer follows as a new message",
                         self._stream_id, exc)
                metrics.STREAM_UPDATES.labels("refused").inc()
                self._ended = True
                if self._stream_id is None and self._on_not_allowed is not None:
                    self._on_not_allowed()
                return 0.0
            metrics.STREAM_UPDATES.labels("throttled").inc()
            return max(exc.retry_after or 0.0, 2 * self._interval)  # 429: wait, then the latest text
        metrics.STREAM_UPDATES.labels("sent").inc()
        self._sequence += 1
        entity = activity["entities"][0]
        if entity["streamType"] == "informative":
            self._sent_informative = activity["text"]
        else:
            self._sent_text = activity["text"]
            crash_point("stream_chunk_sent")
        if self._stream_id is None:
            if not sent_id:
                log.warning("the connector returned no stream id; not streaming this reply")
                self._ended = True
                return 0.0
            self._stream_id = sent_id
            try:
                await self._on_started(sent_id)  # recorded before any text is shown
            except Exception as exc:  # the stream still works; only a crash could not finish it
                log.warning("could not record reply stream %s (%s); a crash now would leave it unfinished",
                            sent_id, exc)
        return self._interval

    async def _close_early(self) -> None:
        """The two-minute limit is near: close the stream with the text so far; the reply carries the rest."""
        if not self._sent_text:
            self._ended = True  # nothing shown but progress: let it lapse, the reply comes plain
            return
        shown = self._sent_text
        try:
            await self._sender.send(self._reference, ai_message(shown + CONTINUED, stream_id=self._stream_id))
        except DeliveryError as exc:
            log.info("could not close reply stream %s early: %s", self._stream_id, exc)
        else:
            self._shown = shown
            metrics.STREAM_UPDATES.labels("closed_early").inc()
        self._ended = True


class TeamsReplyStreams:
    """Implements ``runtime.protocol.ReplyStreams`` for Teams (STREAM_* settings)."""

    def __init__(self, sender: MessageSender, *, first_delay: float, interval: float = STREAM_INTERVAL,
                 max_seconds: float = MAX_STREAM_SECONDS) -> None:
        self._sender = sender
        self._first_delay = first_delay
        self._interval = interval
        self._max_seconds = max_seconds
        #: Conversations whose first stream send was refused (streaming off for that tenant or
        #: client): this process does not try again there; typing and one message instead.
        self._not_allowed: set[str] = set()

    @property
    def max_seconds(self) -> float:
        return self._max_seconds

    def streams_to(self, reference: JSON) -> bool:
        return is_personal_teams_chat(reference) and _conversation_id(reference) not in self._not_allowed

    def open(self, reference: JSON, on_started: StreamStarted) -> TeamsStream:
        return TeamsStream(self._sender, reference, on_started, first_delay=self._first_delay,
                           interval=self._interval, max_seconds=self._max_seconds,
                           on_not_allowed=lambda: self._not_allowed.add(_conversation_id(reference)))


def _conversation_id(reference: JSON) -> str:
    return str((reference.get("conversation") or {}).get("id"))


AiSent = Callable[[JSON, list[str]], Awaitable[None]]


class FinalMessages:
    """The outbox's sender (a ``MessageSender``) for messages that close a stream or carry feedback.

    A final message Teams refuses (the stream expired, the user stopped it, a re-run after a crash
    found it gone) is sent once more without its streaminfo: one complete message. ``on_ai_sent``
    (the feedback store) learns the id of every model-written message that went out.
    """

    def __init__(self, sender: MessageSender, on_ai_sent: AiSent | None = None) -> None:
        self._sender = sender
        self._on_ai_sent = on_ai_sent

    async def send(self, reference: JSON, activity: JSON) -> str | None:
        try:
            sent_id = await self._sender.send(reference, activity)
        except DeliveryError as exc:
            if not exc.permanent or final_stream_id(activity) is None:
                raise
            log.info("Teams refused to close stream %s (%s); sending the answer as a new message",
                     final_stream_id(activity), exc)
            metrics.STREAM_UPDATES.labels("final_refused").inc()
            sent_id = await self._sender.send(reference, without_stream(activity))
        # Teams shows the feedback buttons (other channels, e.g. the Emulator, have none: no write there).
        if self._on_ai_sent is not None and reference.get("channelId") == "msteams" \
                and activity.get("channelData", {}).get("feedbackLoopEnabled"):
            try:  # feedback names the message by its id; a streamed one is known by its stream id too
                await self._on_ai_sent(reference, sorted({i for i in (sent_id, final_stream_id(activity)) if i}))
            except Exception as exc:  # the message is out; only feedback on it would be refused
                log.warning("could not record sent message %s for feedback: %s", sent_id, exc)
        return sent_id

    async def typing(self, reference: JSON) -> None:
        await self._sender.typing(reference)
