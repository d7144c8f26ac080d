"""Streaming (issue 15): how soon a person sees the answer, streamed vs the same reply unstreamed.

One bot process, the offline model's ``think for N seconds`` (N seconds writing an answer of seven
words, streamed word by word). ``runs`` Teams one-on-one chats (streamed) and ``runs`` group chats
(the same reply, unstreamed: typing, then one message) are asked at once. For each we measure,
from the POST of the message: the first text the person can read (streamed: the first ``streaming``
chunk; unstreamed: the message) and the final message. The targets: the first text within 2 s
(the first indicator's 0.5 s delay, one pacing interval, a margin), however long the answer takes,
and the final message no more than 0.5 s later than the unstreamed one (the stream's cost).

``python -m bench --only streaming`` (``--quick``: fewer, shorter answers).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Progress, env_for_bot, fmt_ms, fmt_ratio, percentile, ratio
from harness.activities import message, new_conversation_id
from harness.botproc import BotProcess
from harness.connector import Recorded, RecordingConnector


def _stream_type(entry: Recorded) -> str | None:
    for entity in (entry.activity or {}).get("entities") or ():
        if isinstance(entity, dict) and entity.get("type") == "streaminfo":
            return str(entity.get("streamType"))
    return None


def _first_text(entries: list[Recorded]) -> float | None:
    for entry in entries:
        kind = (entry.activity or {}).get("type")
        if kind == "message" or (kind == "typing" and _stream_type(entry) == "streaming"):
            return entry.time
    return None


def _final(entries: list[Recorded]) -> float | None:
    return next((e.time for e in entries if (e.activity or {}).get("type") == "message"), None)


def run(runs: int, seconds: float, progress: Progress, weight: float) -> dict[str, Any]:
    """Ask ``runs`` personal chats and ``runs`` group chats ``think for <seconds> seconds`` at once."""
    progress.set(f"streaming: {runs} streamed and {runs} unstreamed answers of {seconds:g} s")
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp, RecordingConnector() as connector:
        bot = BotProcess(Path(tmp) / "bot", env=env_for_bot())
        try:
            bot.start(timeout=60)
            posted: dict[str, tuple[str, float]] = {}
            for kind in ("personal", "groupChat"):
                for _ in range(runs):
                    conv = new_conversation_id()
                    activity = message(f"think for {seconds:g} seconds", conversation_id=conv,
                                       service_url=connector.url, channel_id="msteams", conversation_type=kind)
                    posted[conv] = (kind, time.monotonic())
                    status, body = bot.post_activity(activity)
                    assert status == 201, body
            deadline = time.monotonic() + seconds * 4 + 30
            connector.wait_for(lambda c: all(c.messages(conv) for conv in posted),
                               timeout=max(1.0, deadline - time.monotonic()))
        finally:
            bot.kill()
        out: dict[str, Any] = {"runs": runs, "seconds": seconds}
        for kind, name in (("personal", "streamed"), ("groupChat", "unstreamed")):
            first, final = [], []
            for conv, (k, began) in posted.items():
                if k != kind:
                    continue
                entries = connector.delivered(conv)
                first.append((_first_text(entries) or float("nan")) - began)
                final.append((_final(entries) or float("nan")) - began)
            out[name] = {"first_p50": percentile(first, 50), "final_p50": percentile(final, 50),
                         "first_max": max(first), "final_max": max(final)}
    progress.advance(weight)
    return out


def rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str, str, bool]]:
    """(section, figure, ours, baseline, ratio, target, met) for the results table."""
    s, u = res["streamed"], res["unstreamed"]
    sec = "8 streaming"
    label = f"{res['runs']}+{res['runs']} chats, a {res['seconds']:g} s answer"
    first_ratio = ratio(s["first_p50"], u["first_p50"])
    late = s["final_p50"] - u["final_p50"]
    return [
        (sec, f"POST → first text a person reads, p50 ({label})", fmt_ms(s["first_p50"]),
         f"{fmt_ms(u['first_p50'])} (unstreamed: the message)", fmt_ratio(first_ratio), "≤ 2 s",
         s["first_p50"] <= 2.0),
        (sec, f"POST → final message, p50 ({label})", fmt_ms(s["final_p50"]), f"{fmt_ms(u['final_p50'])} (unstreamed)",
         fmt_ratio(ratio(s["final_p50"], u["final_p50"])), "≤ +0.5 s", late <= 0.5),
    ]
