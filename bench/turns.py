"""1. Turn overhead: the real bot against two baselines, all three as real processes.

The baselines: a bare botbuilder echo bot (``echo_bot.py``) and the naive agent bot
(``naive_bot.py``: the same AutoGen agent and offline model run inside the request, its state in
``ConversationState`` over ``MemoryStorage``, no durability), so ``ours / naive`` is the price of
durability and ``ours / echo`` that of durability plus the agent.

Closed loop: each of N simulated users (one per conversation) posts a message, waits until its
reply reaches the recording connector, and posts the next at once. Latency is ingest-to-reply:
from just before the POST to the reply's arrival at the connector (one monotonic clock, same
machine). The real bot acknowledges the POST first and answers later through its inbox,
agent turn, atomic commit and outbox; the echo bot answers inside the request. Same load
generator (aiohttp client), same connector, same machine, same message texts.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Arrival, Progress, SignallingConnector, cpu_seconds, env_for_bot, percentile
from harness.activities import message, new_conversation_id
from harness.botproc import BotProcess


@dataclass
class LoadResult:
    conversations: int
    window: float
    latencies: list[float] = field(default_factory=list)
    completed_in_window: int = 0
    completed: int = 0
    bot_cpu: float = 0.0  # CPU seconds the bot process used during the whole run (all threads)
    loadgen_cpu: float = 0.0  # ... and the load generator + connector process
    errors: int = 0
    strays: int = 0
    #: HTTP answer time of each POST sent in the window (just before the POST to its 2xx)
    answers: list[float] = field(default_factory=list)
    #: from a POST's 2xx to its reply at the connector, POSTs sent in the window (``await_reply`` only)
    after_ack: list[float] = field(default_factory=list)
    #: answers that were not 2xx, by HTTP status
    statuses: dict[int, int] = field(default_factory=dict)

    first_send: float = 0.0
    last_reply: float = 0.0

    @property
    def throughput(self) -> float:
        """Replies per second over the whole run (first POST to last reply, warm-up included): with many
        conversations the bot interleaves their turns, so replies come in waves a short window can miss."""
        span = self.last_reply - self.first_send
        return self.completed / span if span > 0 else float("nan")

    @property
    def cpu_per_turn(self) -> float:
        return self.bot_cpu / self.completed if self.completed else float("nan")

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)


class ReplyWaiter:
    """Routes connector arrivals to the coroutine waiting for that conversation's reply."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: dict[str, tuple[str, asyncio.Future[Arrival]]] = {}
        self.strays = 0

    def expect(self, conversation_id: str, token: str) -> asyncio.Future[Arrival]:
        future: asyncio.Future[Arrival] = self._loop.create_future()
        self._waiting[conversation_id] = (token, future)
        return future

    def on_arrival(self, arrival: Arrival) -> None:  # connector thread
        self._loop.call_soon_threadsafe(self._resolve, arrival)

    def _resolve(self, arrival: Arrival) -> None:
        entry = self._waiting.get(arrival.conversation_id or "")
        if entry is None or entry[0] not in arrival.text or entry[1].done():
            self.strays += 1
            return
        del self._waiting[arrival.conversation_id or ""]
        entry[1].set_result(arrival)


async def closed_loop(url: str, connector: SignallingConnector, conversations: int, warmup: float,
                      window: float, prefix: str, reply_timeout: float = 60.0, *, senders: int | None = None,
                      await_reply: bool = True) -> LoadResult:
    """Run closed-loop users for warmup + window seconds; measure in the window only.

    One user per conversation, unless ``senders`` is given: then that many users share the
    conversations (user i posts to conversations i, i + senders, ... in turn), so a conversation
    still has at most one message in flight. With ``await_reply`` (the default) a user waits for
    the reply at the connector before the next POST and ``latencies`` are ingest→reply; without
    it a user posts again as soon as the bot answers 2xx (ingest load), ``completed`` counts
    acknowledged POSTs, ``last_reply`` is the last acknowledgement and ``latencies`` are the HTTP
    answer times.
    """
    loop = asyncio.get_running_loop()
    waiter = ReplyWaiter(loop)
    connector.listener = waiter.on_arrival
    result = LoadResult(conversations, window)
    start = time.monotonic()
    result.first_send = start
    measure_from, end = start + warmup, start + warmup + window
    conv_ids = [new_conversation_id(prefix) for _ in range(conversations)]
    users = min(senders or conversations, conversations)

    async def user(session: aiohttp.ClientSession, mine: list[str]) -> None:
        n = 0
        while time.monotonic() < end:
            conversation_id = mine[n % len(mine)]
            n += 1
            token = f"U{uuid.uuid4().hex[:10]}"
            activity = message(f"my name is {token}", conversation_id=conversation_id, service_url=connector.url)
            reply = waiter.expect(conversation_id, token) if await_reply else None
            sent = time.monotonic()
            try:
                async with session.post(url, json=activity) as response:
                    await response.read()
                    status = response.status
                acked = time.monotonic()
                if not 200 <= status < 300:
                    result.errors += 1
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    continue
                if sent >= measure_from:
                    result.answers.append(acked - sent)
                if reply is None:
                    result.completed += 1
                    result.last_reply = max(result.last_reply, acked)
                    if sent >= measure_from:
                        result.latencies.append(acked - sent)
                    if measure_from <= acked <= end:
                        result.completed_in_window += 1
                    continue
                arrival = await asyncio.wait_for(reply, reply_timeout)
            except (TimeoutError, aiohttp.ClientError):
                result.errors += 1
                continue
            result.completed += 1
            result.last_reply = max(result.last_reply, arrival.monotonic)
            if sent >= measure_from:
                result.latencies.append(arrival.monotonic - sent)
                result.after_ack.append(arrival.monotonic - acked)
            if measure_from <= arrival.monotonic <= end:
                result.completed_in_window += 1

    limits = aiohttp.TCPConnector(limit=users + 4, force_close=False)
    try:
        async with aiohttp.ClientSession(connector=limits) as session:
            await asyncio.gather(*(user(session, conv_ids[i::users]) for i in range(users)))
    finally:
        connector.listener = None
    result.strays = waiter.strays
    return result


def run(levels: tuple[int, ...], warmup: float, window: float, progress: Progress) -> dict[str, Any]:
    """The three bots as processes; for each level, echo, naive, then ours. Returns the figures per level."""
    out: dict[str, Any] = {"levels": {}, "warmup_s": warmup, "window_s": window}
    with tempfile.TemporaryDirectory(prefix="bench-turns-") as tmp, SignallingConnector() as connector:
        # The baselines send unpaced (the recording connector does not throttle); so does ours here, for like
        # with like: with Teams' 7 messages/s per conversation (the default) a closed loop waits out the pacer.
        ours = BotProcess(Path(tmp) / "ours", env=env_for_bot(SEND_RATE_PER_CONVERSATION="0"))
        echo = BotProcess(Path(tmp) / "echo", env=env_for_bot(), script="bench/echo_bot.py")
        naive = BotProcess(Path(tmp) / "naive", env=env_for_bot(), script="bench/naive_bot.py")
        bots = (("echo", echo), ("naive", naive), ("ours", ours))
        try:
            progress.set("turn overhead: starting the bots")
            for _, bot in bots:
                bot.start(timeout=60)
            for level in levels:
                figures = {}
                for name, bot in bots:
                    progress.set(f"turn overhead: {name}, {level} conversation(s)")
                    cpu_before, self_before = cpu_seconds(bot.pid), cpu_seconds()
                    result = asyncio.run(closed_loop(bot.messages_url, connector, level, warmup, window,
                                                     prefix=f"t{level}{name}"))
                    result.bot_cpu = cpu_seconds(bot.pid) - cpu_before
                    result.loadgen_cpu = cpu_seconds() - self_before
                    figures[name] = result
                    progress.advance(warmup + window)
                out["levels"][level] = figures
        finally:
            for _, bot in bots:
                bot.kill()
    return out
