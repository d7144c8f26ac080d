"""Run every benchmark against its baseline, print the results table, write bench/results.md.

``python -m bench`` (``make bench``, about 15 minutes on 2 cores) or ``python -m bench --quick``
(``make bench-quick``, under 2 minutes, smaller sizes; written to test-artifacts/ instead).
``--only turns,notify,state,jobs,recovery,scaleout`` runs a subset (the table then has only those rows;
written to test-artifacts/bench-<names>.md unless ``--output`` says otherwise).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import REPO, Progress, fmt_ms, fmt_ratio, percentile, quiet_env, ratio

ALL = ("turns", "notify", "state", "jobs", "recovery", "scaleout", "cosmos", "streaming")


@dataclass(frozen=True)
class Sizes:
    levels: tuple[int, ...]
    warmup: float
    window: float
    notify_jobs: int
    notify_conversations: int
    notify_rate: float
    job_seconds: float
    checkpoints: tuple[int, ...]
    scale_jobs: int
    recovery_jobs: int
    recovery_conversations: int
    cold_starts: int
    scale_webs: tuple[int, ...]
    scale_warmup: float
    scale_window: float
    scale_wake_window: float
    scale_local_wake: bool
    cosmos_turns: int = 10

    def scaleout_plan(self) -> Any:
        from bench.scaleout import Plan

        return Plan(webs=self.scale_webs, warmup=self.scale_warmup, window=self.scale_window,
                    wake_window=self.scale_wake_window, local_wake=self.scale_local_wake)

    def weights(self) -> dict[str, float]:
        """Rough seconds per phase on 2 cores, for the progress bar."""
        last = max(self.checkpoints)
        return {
            "turns": len(self.levels) * 3 * (self.warmup + self.window) + 8,
            "notify": 2 * self.notify_jobs / self.notify_rate + 8,
            "state_sqlite": last * 0.007,
            "state_cosmos": last * 0.05 + 3,
            "jobs": self.scale_jobs * 0.015 + 4,
            "recovery": self.recovery_jobs * 0.09 + 2.5 * self.cold_starts + 4,
            "scaleout": self.scaleout_plan().seconds(),
            "cosmos": 6 + self.cosmos_turns * 3.5 + 6,
        }


FULL = Sizes(levels=(1, 10, 100), warmup=3, window=15, notify_jobs=200, notify_conversations=50, notify_rate=10,
             job_seconds=0.5, checkpoints=(10, 100, 1000, 5000), scale_jobs=10_000, recovery_jobs=1000,
             recovery_conversations=100, cold_starts=3, scale_webs=(1, 2, 4), scale_warmup=2, scale_window=10,
             scale_wake_window=8, scale_local_wake=True)
QUICK = Sizes(levels=(1, 10, 100), warmup=1, window=2.5, notify_jobs=40, notify_conversations=20, notify_rate=10,
              job_seconds=0.5, checkpoints=(10, 100, 200), scale_jobs=500, recovery_jobs=50,
              recovery_conversations=10, cold_starts=1, scale_webs=(1, 4), scale_warmup=0.5, scale_window=1.5,
              scale_wake_window=1, scale_local_wake=False, cosmos_turns=3)


# --- the machine and the versions ---------------------------------------------------------------
def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": f"{usable} usable ({os.cpu_count()} online)", "ram": ram,
            "os": f"{platform.system()} {platform.release()}"}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("botbuilder-core", "botbuilder-integration-aiohttp", "autogen-agentchat", "autogen-core", "aiohttp",
                 "APScheduler", "SQLAlchemy", "aiosqlite", "azure-cosmos", "msrest"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    node = shutil.which("node")
    if node:
        out["node"] = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
        package = REPO / "node_modules" / "@vercel" / "cosmosdb-server" / "package.json"
        if package.is_file():
            out["@vercel/cosmosdb-server"] = json.loads(package.read_text()).get("version", "?")
    return out


# --- rows -----------------------------------------------------------------------------------------
@dataclass
class Row:
    section: str
    figure: str
    ours: str
    baseline: str
    ratio: str
    target: str = ""
    verdict: str = ""


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "**MISSED**")


def turn_rows(res: dict[str, Any]) -> list[Row]:
    """Each figure against the naive agent bot (targets: p50 ≤ 1.15x, throughput ≥ 0.9x) and the echo bot
    (stretch: p50 ≤ 1.5x)."""
    rows = []
    for level, figs in res["levels"].items():
        ours, echo, naive = figs["ours"], figs["echo"], figs.get("naive")
        conv = f"{level} conv."
        if naive is not None:
            tput = ratio(ours.throughput, naive.throughput)
            p50 = ratio(ours.p50, naive.p50)
            rows += [
                Row("1 turn", f"activities/s, {conv}", f"{ours.throughput:.1f}/s", f"{naive.throughput:.1f}/s (naive)",
                    fmt_ratio(tput), "≥ 0.9x naive" if level == max(res["levels"]) else "",
                    _verdict(tput >= 0.9) if level == max(res["levels"]) else ""),
                Row("1 turn", f"p50 ingest→reply, {conv}", fmt_ms(ours.p50), f"{fmt_ms(naive.p50)} (naive)",
                    fmt_ratio(p50), "≤ 1.15x naive", _verdict(p50 <= 1.15)),
                Row("1 turn", f"p99 ingest→reply, {conv}", fmt_ms(ours.p99), f"{fmt_ms(naive.p99)} (naive)",
                    fmt_ratio(ratio(ours.p99, naive.p99))),
                Row("1 turn", f"bot CPU per turn, {conv}", fmt_ms(ours.cpu_per_turn),
                    f"{fmt_ms(naive.cpu_per_turn)} (naive)", fmt_ratio(ratio(ours.cpu_per_turn, naive.cpu_per_turn))),
            ]
        p50 = ratio(ours.p50, echo.p50)
        rows += [
            Row("1 turn", f"activities/s, {conv}", f"{ours.throughput:.1f}/s", f"{echo.throughput:.1f}/s (echo)",
                fmt_ratio(ratio(ours.throughput, echo.throughput))),
            Row("1 turn", f"p50 ingest→reply, {conv}", fmt_ms(ours.p50), f"{fmt_ms(echo.p50)} (echo)", fmt_ratio(p50),
                "≤ 1.5x echo (stretch)", _verdict(p50 <= 1.5)),
            Row("1 turn", f"p99 ingest→reply, {conv}", fmt_ms(ours.p99), f"{fmt_ms(echo.p99)} (echo)",
                fmt_ratio(ratio(ours.p99, echo.p99))),
            Row("1 turn", f"bot CPU per turn, {conv}", fmt_ms(ours.cpu_per_turn), f"{fmt_ms(echo.cpu_per_turn)} (echo)",
                fmt_ratio(ratio(ours.cpu_per_turn, echo.cpu_per_turn))),
        ]
    return rows


def notify_rows(res: dict[str, Any]) -> list[Row]:
    ours, echo = res["ours"], res["echo"]
    base = "timer + continue_conversation (echo bot)"
    return [
        Row("2 notify", f"p50 job finished→message ({res['jobs']} jobs)", fmt_ms(ours["p50"]), fmt_ms(echo["p50"]),
            fmt_ratio(ratio(ours["p50"], echo["p50"]))),
        Row("2 notify", f"p99 job finished→message ({res['jobs']} jobs)", fmt_ms(ours["p99"]), fmt_ms(echo["p99"]),
            fmt_ratio(ratio(ours["p99"], echo["p99"])), "< 500 ms", _verdict(ours["p99"] < 0.5)),
        Row("2 notify", "notifications delivered", f"{ours['delivered']}/{ours['acknowledged']}",
            f"{echo['delivered']}/{echo['acknowledged']} ({base})", ""),
    ]


def state_rows(res: dict[str, Any]) -> list[Row]:
    rows = []
    last = max(res["checkpoints"])
    for backend, label in (("sqlite", "SQLite"), ("cosmos", "Cosmos server")):
        figs = res.get(backend) or {}
        if "skipped" in figs:
            rows.append(Row("3 state", f"{label}: skipped", figs["skipped"], "", ""))
            continue
        first, end = figs[10], figs[last]
        commit = ratio(end["commit"], first["commit"])
        rows += [
            Row("3 state", f"{label} commit time/turn @ turn {last:,}", fmt_ms(end["commit"]),
                f"{fmt_ms(first['commit'])} (@ turn 10)", fmt_ratio(commit), "≤ 1.5x turn 10", _verdict(commit <= 1.5)),
            Row("3 state", f"{label} all store calls/turn @ turn {last:,}", fmt_ms(end["store"]),
                f"{fmt_ms(first['store'])} (@ turn 10)", fmt_ratio(ratio(end["store"], first["store"]))),
            Row("3 state", f"{label} stored conversation @ turn {last:,}", f"{end['size'] / 1024:.1f} KiB",
                f"{first['size'] / 1024:.1f} KiB (@ turn 10)", fmt_ratio(ratio(end["size"], first["size"]))),
        ]
    return rows


def job_rows(res: dict[str, Any]) -> list[Row]:
    ours, bare = res["ours"], res["bare"]
    n = ours["jobs"]
    mib = 1024 * 1024

    def per_job(r: dict[str, Any]) -> float:
        return (r["rss_pending"] - r["rss_before"]) / r["jobs"]

    base = "bare APScheduler"
    return [
        Row("4 jobs", f"resident memory, {n:,} jobs pending", f"{ours['rss_pending'] / mib:.0f} MiB",
            f"{bare['rss_pending'] / mib:.0f} MiB ({base})", fmt_ratio(ratio(ours["rss_pending"], bare["rss_pending"])),
            "< 200 MB", _verdict(ours["rss_pending"] < 200e6)),
        Row("4 jobs", "memory per pending job (RSS delta / jobs)", f"{per_job(ours) / 1024:.1f} KiB",
            f"{per_job(bare) / 1024:.1f} KiB", fmt_ratio(ratio(per_job(ours), per_job(bare)))),
        Row("4 jobs", "peak resident memory (incl. completion)", f"{ours['rss_peak'] / mib:.0f} MiB",
            f"{bare['rss_peak'] / mib:.0f} MiB", fmt_ratio(ratio(ours["rss_peak"], bare["rss_peak"]))),
        Row("4 jobs", "jobs scheduled per second", f"{n / ours['schedule_seconds']:.0f}/s",
            f"{n / bare['schedule_seconds']:.0f}/s",
            fmt_ratio(ratio(bare["schedule_seconds"], ours["schedule_seconds"]))),
        Row("4 jobs", f"time until all {n:,} are running", f"{ours['pending_seconds']:.1f} s",
            f"{bare['pending_seconds']:.1f} s", fmt_ratio(ratio(ours["pending_seconds"], bare["pending_seconds"]))),
        Row("4 jobs", "completion notifications delivered",
            f"{ours['notified']:,}/{n:,} in {ours['drain_seconds']:.1f} s",
            f"{bare['notified']:,}/{n:,} in {bare['drain_seconds']:.1f} s", "",
            f"{n:,}/{n:,}", _verdict(ours["notified"] == n)),
    ]


def recovery_rows(res: dict[str, Any]) -> list[Row]:
    rec = res.get("recovery_seconds")
    n = res.get("running_before_kill", res["jobs"])
    return [
        Row("5 recovery", f"restart → all {n:,} jobs running again", f"{rec:.2f} s" if rec is not None else "never",
            f"{res['cold_start']:.2f} s (empty cold start)", fmt_ratio(ratio(rec, res["cold_start"])) if rec else "n/a",
            "< 5 s", _verdict(rec is not None and rec < 5)),
        Row("5 recovery", "restart → /healthz answers", f"{res['healthy_seconds']:.2f} s",
            f"{res['cold_start']:.2f} s", fmt_ratio(ratio(res["healthy_seconds"], res["cold_start"]))),
    ]


def _ops(by_operation: dict[str, Any]) -> str:
    return ", ".join(f"{op} {v['requests']:g}" for op, v in by_operation.items())


def cosmos_rows(res: dict[str, Any]) -> list[Row]:
    from bench.cosmos_requests import monthly_cost

    sec = "7 Cosmos"
    if "skipped" in res:
        return [Row(sec, "Cosmos requests: skipped", res["skipped"], "", "")]
    turn, job, ru = res["turn"], res["job"], res["ru"]
    month = monthly_cost(ru["turn"]["total"])
    # Before issue 17 (commit 6a99012), counted the same way: not re-measured each run.
    base = "17 before issue 17 (15 with the inbox cap off)"
    return [
        Row(sec, f"requests per plain turn (median of {turn['samples']})",
            f"{turn['requests']:g} ({_ops(turn['by_operation'])})", base, "", "≤ 5", _verdict(turn["requests"] <= 5)),
        Row(sec, "full writes of the conversation item per plain turn", f"{turn['conversation_full_writes']:g}",
            "2 before",
            "", "1", _verdict(turn["conversation_full_writes"] <= 1)),
        Row(sec, "bytes sent per plain turn (request bodies)", f"{turn['bytes_sent'] / 1024:.1f} KiB", "6.7 KiB before",
            ""),
        Row(sec, "requests per job (start → announcement, incl. cards)",
            f"{job['requests']:g} ({_ops(job['by_operation'])})", "56 before", ""),
        Row(sec, "bytes sent per job", f"{job['bytes_sent'] / 1024:.1f} KiB", "35.9 KiB before", ""),
        Row(sec, "request units per plain turn / per job (estimate)",
            f"{ru['turn']['total']:.1f} / {ru['job']['total']:.0f} RU", "49.2 / 214 RU before", ""),
        Row(sec, "1 million plain turns a month: serverless", f"${month['serverless_usd']:.2f}",
            f"{month['ru_per_month'] / 1e6:.1f} M RU", ""),
        Row(sec, "1 million plain turns a month: provisioned (manual / autoscale)",
            f"${month['provisioned_usd']:.2f} / ${month['autoscale_usd']:.2f}",
            f"{month['provisioned_rus']:.0f} RU/s (the minimum; mean load {month['mean_rus']:.2f} RU/s)", ""),
    ]


def _pair(p50: float, p99: float) -> str:
    return f"{fmt_ms(p50).removesuffix(' ms')} / {fmt_ms(p99)}"


def scaleout_rows(res: dict[str, Any]) -> list[Row]:
    deps = res["deployments"]
    sec = "6 scale-out"
    base = deps.get("all") or {}
    if "error" in base or "ingest" not in base:
        return [Row(sec, "baseline (all, 1 process) failed", base.get("error", "not run"), "", "")]
    b_in, b_e2e, b_wake = base["ingest"], base["e2e"], base["wake"]
    one = deps.get("1 web") or {}
    rows = []
    for name, f in deps.items():
        if not f["webs"]:
            continue
        if "error" in f:
            rows.append(Row(sec, f"{name} + worker + standby: failed", f["error"][:200], "", ""))
            continue
        ing, e2e = f["ingest"], f["e2e"]
        per_s, vs_all = ing["per_second"], ratio(ing["per_second"], b_in["per_second"])
        if name == "1 web" or "ingest" not in one:
            rows.append(Row(sec, f"ingest: activities acknowledged/s, {name}", f"{per_s:.0f}/s",
                            f"{b_in['per_second']:.0f}/s (all)", fmt_ratio(vs_all)))
        else:
            o = one["ingest"]["per_second"]
            rows.append(Row(sec, f"ingest: activities acknowledged/s, {name}", f"{per_s:.0f}/s",
                            f"{o:.0f}/s (1 web); all {b_in['per_second']:.0f}/s",
                            f"{fmt_ratio(ratio(per_s, o))} ({fmt_ratio(vs_all)} of all)"))
        rows += [
            Row(sec, f"ingest: HTTP answer p50 / p99, {name}", _pair(ing["answer_p50"], ing["answer_p99"]),
                f"{_pair(b_in['answer_p50'], b_in['answer_p99'])} (all)",
                fmt_ratio(ratio(ing["answer_p50"], b_in["answer_p50"]))),
            Row(sec, f"end-to-end: replies/s, {name}", f"{e2e['per_second']:.1f}/s",
                f"{b_e2e['per_second']:.1f}/s (all)", fmt_ratio(ratio(e2e["per_second"], b_e2e["per_second"]))),
            Row(sec, f"end-to-end: p50 / p99 ingest→reply, {name}", _pair(e2e["p50"], e2e["p99"]),
                f"{_pair(b_e2e['p50'], b_e2e['p99'])} (all)", fmt_ratio(ratio(e2e["p50"], b_e2e["p50"]))),
        ]
    cluster = [f for f in deps.values() if f["webs"] and "wake" in f]
    if cluster:
        pooled = [s for f in cluster for s in f["wake"]["after_ack"]]
        p50, p99 = percentile(pooled, 50), percentile(pooled, 99)
        local = deps.get("all, no PostgreSQL", {}).get("wake")
        baseline = f"{_pair(b_wake['after_ack_p50'], b_wake['after_ack_p99'])} (all)"
        if local:
            baseline += f"; {_pair(local['after_ack_p50'], local['after_ack_p99'])} (all, no PostgreSQL)"
        webs = ", ".join(str(f["webs"]) for f in cluster)
        rows.append(Row(sec, f"wake-up web→worker: POST 2xx → reply p50 / p99, one at a time ({webs} web, "
                             f"{len(pooled)} messages)", _pair(p50, p99), baseline,
                        fmt_ratio(ratio(p99, b_wake["after_ack_p99"])) + " (p99)", "p99 < 1 s", _verdict(p99 < 1.0)))
    return rows


def table(rows: list[Row]) -> str:
    head = ["#", "figure", "ours", "baseline", "ours/baseline", "target", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r.section} | {r.figure} | {r.ours} | {r.baseline} | {r.ratio} | {r.target} | {r.verdict} |")
    return "\n".join(lines)


# --- detail tables for results.md ---------------------------------------------------------------------
def details(results: dict[str, Any]) -> str:
    parts = []
    if "turns" in results:
        res = results["turns"]
        lines = ["### 1. Turn overhead per load level",
                 f"Closed loop, {res['warmup_s']:g} s warm-up then {res['window_s']:g} s measured per bot and level; "
                 "activities/s over the whole run, latencies of the messages sent in the measured part. `naive` is the "
                 "same agent run inside the request with its state in `ConversationState` over `MemoryStorage` "
                 "(`bench/naive_bot.py`). Ours keeps each conversation under Teams' 7 messages per second "
                 "(`bot/sender.py`), the baselines do not (the recording connector does not throttle; Teams would): "
                 "that caps ours at 7/s with 1 conversation and at 70/s with 10, where the users' replies queue "
                 "behind the pacer; at 100 conversations both are CPU-bound.", "",
                 "| conversations | bot | activities/s | p50 | p99 | replies measured | bot CPU/turn | errors |",
                 "|---|---|---|---|---|---|---|---|"]
        for level, figs in res["levels"].items():
            for name in ("echo", "naive", "ours"):
                if name not in figs:
                    continue
                r = figs[name]
                lines.append(f"| {level} | {name} | {r.throughput:.1f} | {fmt_ms(r.p50)} | {fmt_ms(r.p99)} | "
                             f"{len(r.latencies)} | {fmt_ms(r.cpu_per_turn)} | {r.errors} |")
        parts.append("\n".join(lines))
    if "notify" in results:
        res = results["notify"]
        parts.append(
            f"### 2. Notifications\n{res['jobs']} activations over {res['conversations']} conversations at "
            f"{res['rate']:g}/s, ACTIVATE_LINE_SECONDS={res['job_seconds']:g}. Max: ours "
            f"{fmt_ms(res['ours']['max'])}, echo {fmt_ms(res['echo']['max'])}.")
    if "state" in results:
        res = results["state"]
        lines = ["### 3. State cost per checkpoint (median of the 10 user turns ending there)", "",
                 "| store | turn | commit/turn | all store calls/turn | whole turn (in-process) | stored item |",
                 "|---|---|---|---|---|---|"]
        for backend in ("sqlite", "cosmos"):
            figs = res.get(backend) or {}
            if "skipped" in figs:
                lines.append(f"| {backend} | skipped: {figs['skipped']} | | | | |")
                continue
            for turn, f in figs.items():
                lines.append(f"| {backend} | {turn:,} | {fmt_ms(f['commit'])} | {fmt_ms(f['store'])} | "
                             f"{fmt_ms(f['turn'])} | {f['size']:,} B |")
        for backend in ("sqlite", "cosmos"):
            figs = res.get(backend) or {}
            if "skipped" in figs or not figs:
                continue
            first, end = figs[min(figs)], figs[max(figs)]
            calls = sorted(set(first.get("by_call", {})) | set(end.get("by_call", {})))
            lines.append("")
            lines.append(f"{backend}, each store method per turn, turn {min(figs):,} → {max(figs):,}: " + ", ".join(
                f"{c} {fmt_ms(first['by_call'].get(c, 0.0))} → {fmt_ms(end['by_call'].get(c, 0.0))}" for c in calls))
        parts.append("\n".join(lines))
    if "jobs" in results:
        res = results["jobs"]
        lines = ["### 4. Job scale (raw)", "", "| mode | " + " | ".join(k for k in res["ours"] if k != "mode") + " |",
                 "|---|" + "---|" * (len(res["ours"]) - 1)]
        for mode in ("ours", "bare"):
            r = res[mode]
            lines.append(f"| {mode} | " + " | ".join(_cell(r.get(k)) for k in res["ours"] if k != "mode") + " |")
        parts.append("\n".join(lines))
    if "recovery" in results:
        res = results["recovery"]
        parts.append("### 5. Recovery (raw)\n" + ", ".join(f"{k}={_cell(v)}" for k, v in res.items() if k != "log"))
    if "scaleout" in results:
        parts.append(scaleout_details(results["scaleout"]))
    if "cosmos" in results and "skipped" not in results["cosmos"]:
        parts.append(cosmos_details(results["cosmos"]))
    return "\n\n".join(parts)


def cosmos_details(res: dict[str, Any]) -> str:
    from bench import cosmos_requests as cr

    turn, job, ru = res["turn"], res["job"], res["ru"]
    lines = ["### 7. Cosmos DB requests per plain turn and per job, and what they cost",
             "Counted at the Cosmos DB wire server (every request it received, `harness/peers/cosmos_server.js`), the "
             "real app with its default ingest limits; a plain turn is `my name is …` in a conversation that already "
             "had two turns, from the POST until the app is quiet. One plain turn, request by request:", "",
             "| # | operation | item | bytes sent | RU (estimate) |", "|---|---|---|---|---|"]
    for n, (entry, units) in enumerate(zip(turn["example"], ru["turn"]["entries"], strict=True), 1):
        lines.append(f"| {n} | {entry['operation']} | `{entry['id'] or '(query)'}` | {entry['bytes']:,} | "
                     f"{units:.1f} |")
    lines += ["", f"The job (`activate line …`, from the POST to the completion message and quiet): {job['requests']} "
              f"requests ({_ops(job['by_operation'])}), {job['bytes_sent']:,} bytes sent, "
              f"{job['conversation_full_writes']} full writes of the conversation item.", "",
              "**Request units.** Estimated from the counted operations with Microsoft's published figures: a point "
              f"read of an item up to 1 KB costs {cr.READ_RU_PER_KB:g} RU (+1 RU per further KB), a write (create, "
              f"replace, upsert, patch, delete) of up to 1 KB about {cr.WRITE_RU_BASE:g} RU "
              f"(+{cr.WRITE_RU_PER_EXTRA_KB:g} RU per further KB), a small single-partition query served by the "
              f"index about {cr.QUERY_RU_MIN:g} RU, a "
              "batch the sum of its operations (each operation priced from its share of the request body, the "
              "conversation item's replace first). Assumptions: default indexing minus the excluded paths "
              "(`storage/cosmos.py INDEXING_POLICY`), Session consistency, a single write region, no retries; a point "
              "read is priced at the size last written of that item (the conversation item) or 1 KB. The real service "
              "reports the exact charge in `x-ms-request-charge`; measure it there before sizing an account. "
              f"Per plain turn: **{ru['turn']['total']:.1f} RU** "
              f"({', '.join(f'{k} {v:.1f}' for k, v in ru['turn']['by_operation'].items())}); per job: "
              f"**{ru['job']['total']:.0f} RU**.", ""]
    month = cr.monthly_cost(ru["turn"]["total"])
    breakeven = month["provisioned_usd"] / cr.SERVERLESS_USD_PER_MILLION_RU * 1e6
    lines += ["**What the wire server lacks, and the design chosen** (docs/architecture.md, \"Round trips per "
              "turn\"). The Cosmos DB wire-protocol test server runs a batch request in order without rollback (the "
              "real service runs it as a transaction) and scans the whole container per query (the real service "
              "uses the index). The commit is therefore still one conditional replace of the conversation item "
              "that alone decides whether the turn happened; the processed flags of the turn's events ride in the "
              "same batch request after it, as hints (the item's `processed` list stays the truth). On the real "
              "service the same batch is atomic, so there the `processed` list and the job intents could go "
              "altogether (flags and job items written with the commit). Sent messages leave the outbox by a "
              "conditional patch (`remove /outbox/<n>`), not a rewrite of the item. Not done: the edge still "
              "reads three times before the append (the inbox cap's query, the redelivery check, the dialog "
              "state); folding the redelivery check into the cap's query and reading dialog state only when a "
              "dialog can be pending would make a plain turn 5 requests.", ""]
    lines += [f"**1 million plain turns a month** = {month['ru_per_month'] / 1e6:.1f} million RU: on **serverless** "
              f"(USD {cr.SERVERLESS_USD_PER_MILLION_RU:g} per million RU) **USD {month['serverless_usd']:.2f}** a "
              "month plus storage; on **provisioned throughput** the mean load is "
              f"{month['mean_rus']:.2f} RU/s, so the container's minimum of {month['provisioned_rus']:.0f} RU/s "
              f"(sized for a peak of 10x the mean) costs **USD {month['provisioned_usd']:.2f}** a month (manual, USD "
              f"{cr.PROVISIONED_USD_PER_100RUS_HOUR:g} per 100 RU/s per hour) or about USD "
              f"{month['autoscale_usd']:.2f} (autoscale, max {month['autoscale_max_rus']:.0f} RU/s, billed at its 10% "
              "floor). List prices of one region, without free tier or reserved-capacity discounts: the minimum "
              f"provisioned container costs as much as {breakeven / 1e6:.0f} million serverless RU "
              f"({breakeven / ru['turn']['total'] / 1e6:.0f} million plain turns) a month. Jobs come on top at the "
              "per-job figure."]
    return "\n".join(lines)


def scaleout_details(res: dict[str, Any]) -> str:
    plan = res["plan"]
    lines = [
        "### 6. Scale-out per deployment",
        f"Conversation store: {plan['store']} (one `DATA_DIR` shared by all processes); PostgreSQL for the job "
        "store, the worker lock and the wake-ups (`all, no PostgreSQL`: SQLite job store, in-process wake-ups; "
        f"wake-up phase only). Every deployment behind the round-robin proxy in its own process. Wake-up: one "
        f"sender, one message at a time over 10 conversations, {plan['wake_window']:g} s. End-to-end: closed loop, "
        f"{plan['e2e_conversations']} conversations, {plan['warmup']:g} s warm-up + {plan['window']:g} s. Ingest: "
        f"{plan['ingest_senders']} senders over {plan['ingest_conversations']} conversations posting again on "
        f"each 2xx, {plan['warmup']:g} s warm-up + {plan['window']:g} s (acknowledged/s in the window).", "",
        "| deployment | start | wake-up 2xx→reply p50 / p99 (n) | end-to-end replies/s | ingest→reply p50 / p99 | "
        "ingest ack/s | HTTP answer p50 / p99 | failed POSTs | ERROR / WARNING lines in the bot logs |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name, f in res["deployments"].items():
        if "error" in f:
            lines.append(f"| {name} | failed: {f['error'][:300]} | | | | | | | {f['logs']['errors']} / "
                         f"{f['logs']['warnings']} |")
            continue
        w = f["wake"]
        row = f"| {name} | {f['startup_s']:.1f} s | {_pair(w['after_ack_p50'], w['after_ack_p99'])} ({w['samples']}) | "
        if "e2e" in f:
            e, i = f["e2e"], f["ingest"]
            failed = e["errors"] + i["errors"] + w["errors"]
            statuses = {**e["statuses"]}
            for code, count in i["statuses"].items():
                statuses[code] = statuses.get(code, 0) + count
            detail = f" ({', '.join(f'{c}: {n}' for c, n in sorted(statuses.items()))})" if statuses else ""
            row += (f"{e['per_second']:.1f} | {_pair(e['p50'], e['p99'])} | {i['per_second']:.0f} | "
                    f"{_pair(i['answer_p50'], i['answer_p99'])} | {failed}{detail} |")
        else:
            row += f"| | | | {w['errors']} |"
        lines.append(row + f" {f['logs']['errors']} / {f['logs']['warnings']} |")
    for kind in ("error", "warning"):
        firsts = [f"{name}: {f['logs'][f'first_{kind}']}" for name, f in res["deployments"].items()
                  if f["logs"][f"first_{kind}"]]
        if firsts:
            lines += ["", f"First {kind.upper()} line per deployment: " + "; ".join(f"`{p}`" for p in firsts)]
    kinds = ["all", "web", "worker", "standby", "proxy", "postgres", "cosmos server", "bench"]
    lines += ["", "CPU per process kind in cores (CPU seconds / wall seconds of the phase; `web` is the sum over "
              "the web instances, `postgres` the server and its backends, `bench` the load generator and the "
              "recording connector). The machine has 2 cores.", "",
              "| deployment | phase | " + " | ".join(kinds) + " | total |", "|---|---|" + "---|" * (len(kinds) + 1)]
    for name, f in res["deployments"].items():
        for phase, cpu in f.get("cpu", {}).items():
            if not cpu:
                continue
            cells = [f"{cpu[k]:.2f}" if k in cpu else "" for k in kinds]
            lines.append(f"| {name} | {phase} | " + " | ".join(cells) + f" | {sum(cpu.values()):.2f} |")
    return "\n".join(lines)


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int) and value > 10**6:
        return f"{value / 1024 / 1024:.1f} MiB"
    return str(value)


# --- running ------------------------------------------------------------------------------------------
def run_jobscale(mode: str, jobs: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.jobscale", "--mode", mode, "--jobs", str(jobs)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.jobscale --mode {mode} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes)")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--output", type=Path, help="where to write the Markdown results")
    args = parser.parse_args()
    quiet_env()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(only) - set(ALL)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else FULL
    # A subset goes to test-artifacts/ (it would replace every other figure in results.md).
    tag = "-quick" if args.quick else f"-{'-'.join(only)}" if set(only) != set(ALL) else ""
    default = REPO / "test-artifacts" / f"bench{tag}.md" if tag else REPO / "bench" / "results.md"
    output = args.output or default
    weights = sizes.weights()
    total = sum(w for k, w in weights.items() if k.split("_")[0] in only)
    progress = Progress(total)
    started = time.monotonic()
    date = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    results: dict[str, Any] = {}

    from bench import notify, recovery, state, turns

    if "turns" in only:
        w = weights["turns"] / (len(sizes.levels) * 3 * (sizes.warmup + sizes.window) + 8)
        progress_scaled = _Scaled(progress, w)
        results["turns"] = turns.run(sizes.levels, sizes.warmup, sizes.window, progress_scaled)
        progress_scaled.settle(weights["turns"])
    if "notify" in only:
        results["notify"] = notify.run(sizes.notify_jobs, sizes.notify_conversations, sizes.notify_rate,
                                       sizes.job_seconds, progress, weights["notify"])
    if "state" in only:
        results["state"] = state.run(sizes.checkpoints, progress, weights["state_sqlite"], weights["state_cosmos"])
    if "jobs" in only:
        progress.set(f"job scale: ours, {sizes.scale_jobs:,} jobs (own process)")
        ours = run_jobscale("ours", sizes.scale_jobs)
        progress.advance(weights["jobs"] * 0.75, f"job scale: bare APScheduler, {sizes.scale_jobs:,} jobs")
        bare = run_jobscale("bare", sizes.scale_jobs)
        progress.advance(weights["jobs"] * 0.25)
        results["jobs"] = {"ours": ours, "bare": bare}
    if "recovery" in only:
        results["recovery"] = recovery.run(sizes.recovery_jobs, sizes.recovery_conversations, progress,
                                           weights["recovery"], sizes.cold_starts)
    if "scaleout" in only:
        from bench import scaleout

        results["scaleout"] = scaleout.run(sizes.scaleout_plan(), progress, weights["scaleout"])
    if "cosmos" in only:
        from bench import cosmos_requests

        results["cosmos"] = cosmos_requests.run(sizes.cosmos_turns, progress, weights["cosmos"])
    if "streaming" in only:  # issue 15: bench/streaming.py
        from bench import streaming

        results["streaming"] = streaming.run(3 if args.quick else 5, 3.0 if args.quick else 6.0, progress, 8.0)
    progress.finish()
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()

    rows: list[Row] = []
    for name, build in (("turns", turn_rows), ("notify", notify_rows), ("state", state_rows), ("jobs", job_rows),
                        ("recovery", recovery_rows), ("scaleout", scaleout_rows), ("cosmos", cosmos_rows)):
        if name in results:
            rows += build(results[name])
    if "streaming" in results:
        rows += [Row(*r[:6], verdict=_verdict(r[6])) for r in streaming.rows(results["streaming"])]
    summary = table(rows)
    print()
    print(summary)
    print(f"\n{'quick ' if args.quick else ''}benchmarks took {elapsed / 60:.1f} min; written to {output}")

    m, v = machine(), versions()
    subset = f" --only {','.join(only)}" if set(only) != set(ALL) else ""
    command = f"python -m bench{' --quick' if args.quick else ''}{subset}"
    if not subset:
        command = f"{'make bench-quick' if args.quick else 'make bench'}` (`{command}"
    doc = [
        "# Benchmarks: results",
        "",
        f"Written by `{command}` on "
        f"{date:%Y-%m-%d %H:%M} UTC; the whole run took {elapsed / 60:.1f} minutes. Every figure is measured in "
        "the same run as its baseline; *ours/baseline* is the ratio (lower is better, except for throughput). "
        "What each figure means and how it is measured: [README.md](README.md). Where a target is missed, "
        "where the time goes: [profiling.md](profiling.md).",
        "",
        f"**Machine:** {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['os']}. Load average (1/5/15 min) "
        f"before the run {_load(load_before)}, after it {_load(load_after)}: the benchmarks' own processes "
        "account for about 2; more means something else shared the cores and the figures are noisier.  ",
        "**Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        summary,
        "",
        details(results),
        "",
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(doc), encoding="utf-8")
    raw = REPO / "test-artifacts" / f"bench{tag}-raw.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(_jsonable(results), indent=1, default=str), encoding="utf-8")
    return 0


class _Scaled(Progress):
    """Progress in a benchmark's own units, scaled into the run's bar."""

    def __init__(self, parent: Progress, scale: float) -> None:
        self._parent, self._scale, self._given = parent, scale, 0.0

    def set(self, label: str) -> None:
        self._parent.set(label)

    def advance(self, amount: float, label: str | None = None) -> None:
        self._given += amount * self._scale
        self._parent.advance(amount * self._scale, label)

    def settle(self, weight: float) -> None:
        if weight > self._given:
            self._parent.advance(weight - self._given)

    def finish(self) -> None:
        pass


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    return value


if __name__ == "__main__":
    sys.exit(main())
