"""Crash soak: many conversations with jobs while the bot is SIGKILLed and restarted at random.

A load thread plays the channel: it posts activities and, like the Bot Connector, redelivers
one (same activity id) until the bot acknowledges it with a 2xx. Every acknowledged message
goes into a ledger with the reply it must produce; every acknowledged activation also with
its completion message. A killer thread SIGKILLs the real app process at random moments and
starts it again. At the end the ledger is checked against what the recording connector got:

    conversations, messages, jobs, kills, lost (must be 0), duplicates (only the window
    between a send and its outbox mark may produce one), unloadable conversations (must be 0)

Usage: ``python scripts/soak.py --kills 60`` (``make soak``); the test suite runs a short form.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.sqlite import SqliteStore  # noqa: E402
from tests.support.activities import message, new_conversation_id  # noqa: E402
from tests.support.botproc import BotProcess  # noqa: E402
from tests.support.connector import RecordingConnector  # noqa: E402


@dataclass
class Ledger:
    expected: list[tuple[str, str]] = field(default_factory=list)  # (conversation, text it must receive)
    messages: int = 0
    jobs: int = 0
    kills: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class SoakReport:
    conversations: int
    messages: int
    jobs: int
    kills: int
    lost: list[tuple[str, str]]
    duplicates: int
    unloadable: list[str]

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unloadable

    def summary(self) -> str:
        return (f"conversations={self.conversations} messages={self.messages} jobs={self.jobs} kills={self.kills} "
                f"lost={len(self.lost)} duplicates={self.duplicates} unloadable={len(self.unloadable)}")


def _post_until_acknowledged(bot: BotProcess, activity: dict[str, object], stop: threading.Event) -> bool:
    """Redeliver like the channel does until a 2xx; False if the soak is stopping."""
    while not stop.is_set():
        try:
            status, _ = bot.post_activity(activity, timeout=5)
        except OSError:
            status = 0  # the bot is down (being killed or restarting)
        if 200 <= status < 300:
            return True
        time.sleep(0.1)
    return False


def run_soak(kills: int, conversations: int, seed: int, data_dir: Path, job_seconds: float = 1.0,
             progress: bool = True) -> SoakReport:
    rng = random.Random(seed)
    ledger = Ledger()
    convs = [new_conversation_id("soak") for _ in range(conversations)]
    stop_load, stop_all = threading.Event(), threading.Event()
    with RecordingConnector() as conn:
        bot = BotProcess(data_dir, env={"ACTIVATE_LINE_SECONDS": str(job_seconds), "LOG_LEVEL": "WARNING"})
        bot.start()

        def load() -> None:
            counter = 0
            while not stop_load.is_set():
                conv = rng.choice(convs)
                counter += 1
                if rng.random() < 0.3:
                    number = f"555-{counter % 10000:04d}"
                    activity = message(f"activate line {number}", conversation_id=conv, service_url=conn.url)
                    if _post_until_acknowledged(bot, activity, stop_all):
                        with ledger.lock:
                            ledger.messages += 1
                            ledger.jobs += 1
                            ledger.expected.append((conv, f"started activating line {number} "))
                            ledger.expected.append((conv, f"✅ Line {number} is active"))
                else:
                    name = f"Soak{counter}"
                    activity = message(f"my name is {name}", conversation_id=conv, service_url=conn.url)
                    if _post_until_acknowledged(bot, activity, stop_all):
                        with ledger.lock:
                            ledger.messages += 1
                            ledger.expected.append((conv, f"Nice to meet you, {name}."))
                time.sleep(rng.uniform(0.01, 0.08))

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            for n in range(1, kills + 1):
                time.sleep(rng.uniform(0.3, 2.5))
                bot.kill()
                ledger.kills += 1
                bot.start(timeout=60)
                if progress:
                    bar = "#" * (30 * n // kills)
                    print(f"\rsoak [{bar:<30}] kills {n}/{kills} messages {ledger.messages} jobs {ledger.jobs}",
                          end="", file=sys.stderr, flush=True)
            stop_load.set()
            loader.join(30)
            expected = list(ledger.expected)
            deadline = time.monotonic() + 60 + job_seconds * 3

            def missing() -> list[tuple[str, str]]:
                texts = {c: conn.texts(c) for c in convs}
                return [(c, t) for c, t in expected if not any(t in got for got in texts[c])]

            while (lost := missing()) and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(1.0)  # let any late repeat arrive before counting duplicates
            # Every expected text is unique (names and line numbers are), so a repeat is a duplicate.
            duplicates = sum(n - 1 for conv in convs for n in Counter(conn.texts(conv)).values() if n > 1)
        finally:
            stop_all.set()
            stop_load.set()
            bot.kill()
        if progress:
            print(file=sys.stderr)
        unloadable = asyncio.run(_unloadable(data_dir, [f"emulator:{c}" for c in convs]))
    return SoakReport(conversations, ledger.messages, ledger.jobs, ledger.kills, lost, duplicates, unloadable)


async def _unloadable(data_dir: Path, keys: list[str]) -> list[str]:
    store = SqliteStore(data_dir / "conversations.sqlite3")
    await store.open()
    bad = []
    try:
        for key in keys:
            try:
                record = await store.load(key)
                if await store.pending_events(key) or record.outbox:
                    bad.append(f"{key}: work left over")
            except Exception as exc:  # any failure to load is what we count
                bad.append(f"{key}: {exc}")
    finally:
        await store.close()
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--job-seconds", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        report = run_soak(args.kills, args.conversations, args.seed, Path(tmp), args.job_seconds)
    print(report.summary())
    for conv, text in report.lost[:20]:
        print(f"LOST in {conv}: {text!r}")
    for problem in report.unloadable[:20]:
        print(f"UNLOADABLE {problem}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
