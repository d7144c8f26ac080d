"""Prometheus metrics: one registry and the metric objects the bot updates (served at ``/metrics``).

Counters and histograms are per process (they restart at zero with it, as Prometheus expects);
``teams_agent_jobs`` is read from the store at each scrape, so it counts every queued or
running job whichever process started it. No label carries a conversation key or a job id:
label values are bounded (outcomes, tool names, HTTP statuses).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter as Tally
from collections.abc import Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger(__name__)

PREFIX = "teams_agent_"

# No *_created series: they double what a scrape carries and nothing here needs them.
disable_created_metrics()

#: Our own registry (not prometheus_client's global one): what /metrics shows is exactly this.
REGISTRY = CollectorRegistry(auto_describe=True)
# The standard process_*, python_info and python_gc_* series, as the default registry has them.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# --- instances (cluster/) ---
ACTIVE_WORKER = Gauge(f"{PREFIX}active_worker", "1 while this process is an active worker (holds a partition: "
                      "runs its inboxes, jobs and sends), 0 on web instances and workers without a partition",
                      registry=REGISTRY)
# Issue 18: partitions over many workers.
PARTITIONS_OWNED = Gauge(f"{PREFIX}partitions_owned", "Conversation partitions this worker holds a lease on",
                         registry=REGISTRY)
REBALANCES = Counter(f"{PREFIX}partition_changes", "Partitions this worker took (gained) or gave up (released: "
                     "handed back for a fair share; lost: its lease ran out before it could renew)", ["change"],
                     registry=REGISTRY)
LEASE_RENEWALS = Counter(f"{PREFIX}lease_renewals", "Rounds in which this worker renewed its partition leases",
                         registry=REGISTRY)
FENCED_WRITES = Counter(f"{PREFIX}fenced_writes", "Writes, sends and job starts refused because this worker no "
                        "longer owned the conversation, by who refused: lease (its own monotonic deadline) or "
                        "store (the epoch fence on commit)", ["by"], registry=REGISTRY)
WAKEUPS = Counter(f"{PREFIX}wakeups", "Conversations woken on the active worker, by source: local (same "
                  "process), notify (PostgreSQL NOTIFY from another instance), sweep (found by the periodic "
                  "look for missed work)", ["source"], registry=REGISTRY)

# --- the edge (bot/edge.py) ---
ACTIVITIES_REJECTED = Counter(f"{PREFIX}activities_rejected", "POST /api/messages answered 4xx, by status: 400 "
                              "(not JSON, nested too deeply, not a valid activity), 401 (no or bad token), 408 (the "
                              "body did not arrive in time), 413 (too large), 415 (not JSON)", ["status"],
                              registry=REGISTRY)

# --- agent turns (agent/processor.py) ---
TURNS = Counter(f"{PREFIX}turns", "Agent turns run (one per user message or job result the model answered), "
                "by outcome: ok, or failed (the model or a tool failed; the user was told)",
                ["outcome"], registry=REGISTRY)
TURN_SECONDS = Histogram(f"{PREFIX}turn_duration_seconds", "How long one agent turn took (model calls and tools)",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300), registry=REGISTRY)
TURN_CONFLICTS = Counter(f"{PREFIX}turn_conflicts", "Turns redone because the conversation changed while they ran",
                         registry=REGISTRY)

# --- outbox and delivery (agent/processor.py, bot/sender.py) ---
OUTBOX_BACKLOG = Gauge(f"{PREFIX}outbox_backlog", "Committed messages not yet accepted by the channel, in "
                       "conversations this process has worked on", registry=REGISTRY)
OUTBOX_SENT = Counter(f"{PREFIX}outbox_sent", "Outbox messages the channel accepted", registry=REGISTRY)
STREAM_UPDATES = Counter(f"{PREFIX}stream_updates", "Streamed reply updates (Teams personal chats), by outcome: "
                         "sent, throttled (429), refused (403 ContentStreamNotAllowed or another permanent error), "
                         "closed_early (the two-minute limit), final_refused (the final message went plain)",
                         ["outcome"], registry=REGISTRY)
FEEDBACK = Counter(f"{PREFIX}feedback", "Feedback on model-written messages (thumbs up/down), by reaction (like, "
                   "dislike) or the reason it was refused (unknown_message, malformed)", ["outcome"], registry=REGISTRY)
OUTBOX_DROPPED = Counter(f"{PREFIX}outbox_dropped", "Outbox messages given up, by reason: permanent (4xx such as "
                         "403/404), gave_up (too many failed rounds), no_reference", ["reason"], registry=REGISTRY)
DELIVERY_RETRIES = Counter(f"{PREFIX}delivery_retries", "Outbox rounds postponed after a transient delivery failure",
                           registry=REGISTRY)
CONNECTOR_ERRORS = Counter(f"{PREFIX}connector_errors", "Failed calls to the Bot Connector (each attempt), by "
                           "reason: an HTTP status, timeout, unreachable or error", ["reason"], registry=REGISTRY)
UNTRUSTED_SERVICE_URLS = Counter(f"{PREFIX}untrusted_service_urls", "serviceUrls refused (TRUSTED_SERVICE_URLS), "
                                 "by where: edge (activity refused, 403), store (reference not stored), send (a "
                                 "stored reference not sent to)", ["where"], registry=REGISTRY)

# --- background jobs (jobs/runner.py) ---
JOBS = Gauge(f"{PREFIX}jobs", "Unfinished jobs in the store by state (queued, running), read at each scrape",
             ["state"], registry=REGISTRY)
JOB_ATTEMPTS = Counter(f"{PREFIX}job_attempts", "Job attempts started", ["tool"], registry=REGISTRY)
JOB_RETRIES = Counter(f"{PREFIX}job_retries", "Failed job attempts scheduled to run again", ["tool"],
                      registry=REGISTRY)
JOBS_FINISHED = Counter(f"{PREFIX}jobs_finished", "Jobs that ended, by tool and status (succeeded, failed, "
                        "cancelled)", ["tool", "status"], registry=REGISTRY)
JOB_SECONDS = Histogram(f"{PREFIX}job_duration_seconds", "From a job's first start to its end (retries and "
                        "restarts included), by tool and status", ["tool", "status"],
                        buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400), registry=REGISTRY)

# --- tool policy, job ownership and job caps (agent/tool_policy.py, jobs/access.py, jobs/caps.py) ---
TOOL_CALLS_REFUSED = Counter(f"{PREFIX}tool_calls_refused", "Tool calls refused before anything ran, by reason: "
                             "disabled (ENABLED_TOOLS / DISABLED_TOOLS), not_allowed (TOOL_POLICY_FILE), run_phrase "
                             "(the offline model's run phrase outside local mode), no_requester (a job-result turn "
                             "tried to start a job), conversation_cap / user_cap (MAX_ACTIVE_JOBS_PER_*)",
                             ["reason"], registry=REGISTRY)
CANCELS_REFUSED = Counter(f"{PREFIX}job_cancels_refused", "Job cancels refused because the requester neither "
                          "started the job nor is in ADMINS", registry=REGISTRY)
APPROVALS_REFUSED = Counter(f"{PREFIX}job_approvals_refused", "Approve / Reject clicks refused because the clicker "
                            "neither asked nor is in APPROVERS (issue 16)", registry=REGISTRY)
# --- abuse limits (bot/rate_limits.py, agent/budget.py) ---
RATE_LIMITED = Counter(f"{PREFIX}rate_limited", "Messages refused at ingest (not stored, not seen by the model), by "
                       "scope: user (the sender's rate), conversation (the conversation's rate), inbox "
                       "(MAX_PENDING_EVENTS unprocessed events waiting)", ["scope"], registry=REGISTRY)
MODEL_TOKENS = Counter(f"{PREFIX}model_tokens", "Tokens the model service reported using, by kind: prompt, "
                       "completion", ["kind"], registry=REGISTRY)
BUDGET_EXHAUSTED = Counter(f"{PREFIX}budget_exhausted", "Turns answered without the model because a daily token "
                           "budget was spent, by scope: tenant, conversation", ["scope"], registry=REGISTRY)

UNFINISHED_STATES = ("queued", "running", "awaiting_approval")

_backlog: dict[str, int] = {}


def turn_done(outcome: str, seconds: float) -> None:
    TURNS.labels(outcome).inc()
    TURN_SECONDS.observe(seconds)


def outbox_backlog(conversation_key: str, size: int) -> None:
    """Record how many unsent messages a conversation's outbox holds now."""
    OUTBOX_BACKLOG.inc(size - _backlog.get(conversation_key, 0))
    if size:
        _backlog[conversation_key] = size
    else:
        _backlog.pop(conversation_key, None)


def connector_error(reason: str) -> None:
    CONNECTOR_ERRORS.labels(reason).inc()


def job_finished(tool: str, status: str, started_at: float | None, finished_at: float | None) -> None:
    JOBS_FINISHED.labels(tool, status).inc()
    if started_at is not None and finished_at is not None:  # None: cancelled or failed before it ever ran
        JOB_SECONDS.labels(tool, status).observe(max(0.0, finished_at - started_at))


class _JobStatus(Protocol):
    @property
    def status(self) -> str: ...


class _UnfinishedJobs(Protocol):
    """What :func:`refresh_jobs` reads of a store (a protocol: runtime imports no storage)."""

    async def unfinished_jobs(self) -> Sequence[_JobStatus]: ...


async def refresh_jobs(store: _UnfinishedJobs, timeout: float = 2.0) -> None:
    """Set ``teams_agent_jobs`` from the store; if it cannot answer in time the series are left out."""
    try:
        async with asyncio.timeout(timeout):
            jobs = await store.unfinished_jobs()
    except Exception as exc:  # the store's health is /readyz's business: a scrape must not fail
        log.debug("metrics: could not count unfinished jobs: %s", exc)
        JOBS.clear()
        return
    counts = Tally(job.status for job in jobs)
    for state in UNFINISHED_STATES:
        JOBS.labels(state).set(counts.get(state, 0))


def render(accept: str | None) -> tuple[bytes, str]:
    """The registry in the exposition format the scraper asked for (``Accept``): body and content type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(REGISTRY), content_type
