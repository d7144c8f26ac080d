"""Composition root: Settings -> stores -> scheduler -> adapter -> bot -> aiohttp app.

Only this module picks concrete implementations; everything else receives what it needs.
Run with ``python app.py`` (``make run``); ``--role web|worker`` splits the two halves over
several processes that share the stores (docs/deployment.md):

- web: ``/api/messages``: ingest, card invokes and commands, answered from the shared store;
- worker: inboxes (the agent), jobs (APScheduler) and proactive sends; every worker is active for
  the partitions of the conversations it leases (agent/worker.py, cluster/);
- all (default): both in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from botbuilder.core import ConversationState

from agent.budget import TokenBudget
from agent.mcp import McpConfigError, McpHub, load_mcp_config
from agent.models import create_model_client
from agent.offline_model import OfflineChatCompletionClient
from agent.processor import FIRST_INDICATOR_DELAY, ConversationProcessor
from agent.runner import DEFAULT_SYSTEM_MESSAGE, AgentTurnRunner
from agent.tool_policy import ToolPolicy, ToolPolicyError
from agent.tools import turn_tools
from agent.worker import Wakeups, Worker
from bot.approval_cards import card_for_activity
from bot.approvals import ApprovalClicks
from bot.auth import TenantPolicy
from bot.cards import jobs_list_card, welcome_activity
from bot.dialog_storage import ConversationStoreStorage
from bot.edge import MAX_BODY_BYTES, create_adapter, messages_handler
from bot.feedback import Feedback
from bot.handler import TeamsBot, request_reset
from bot.job_cards import JobCardUpdater
from bot.rate_limits import IngestLimits
from bot.sender import ProactiveSender
from bot.service_urls import ServiceUrlPolicy
from bot.streaming import FinalMessages, TeamsReplyStreams
from cluster import Coordinator, LocalCoordinator
from dialogs.commands import CommandDialogs
from dialogs.help import help_text
from jobs.access import JobAccess
from jobs.approval import ApprovalPolicy, Approvals
from jobs.cancel import JobCancels
from jobs.caps import JobCaps
from jobs.registry import JobRegistry, load_tool_modules
from jobs.runner import JobRunner
from jobs.scheduler import JobScheduler
from runtime import logs, metrics, ops, tracing
from runtime.config import ConfigError, Settings
from runtime.lifecycle import StartupError, resource, starting
from storage.abc import ConversationStore
from storage.inbox import Inbox
from storage.sqlite import SqliteStore

log = logging.getLogger("app")

#: The next step in local mode (README, "Try it locally"): a client for the messaging endpoint.
PLAYGROUND = "npx -y -p @microsoft/m365agentsplayground agentsplayground -e {url} -c msteams --disable-telemetry"


@dataclass
class Services:
    """What create_app built that tests and the ops endpoints reach through ``app[SERVICES]``."""

    settings: Settings
    store: ConversationStore
    coordinator: Coordinator
    scheduler: JobScheduler
    readiness: ops.Readiness


SERVICES = web.AppKey("services", Services)


def build_store(settings: Settings) -> ConversationStore:
    if settings.cosmos_endpoint:
        from storage.cosmos import CosmosStore

        return CosmosStore(
            settings.cosmos_endpoint,
            settings.cosmos_key or None,  # no key: Entra ID through DefaultAzureCredential
            settings.cosmos_database,
            settings.cosmos_container,
            conversation_ttl_days=settings.conversation_ttl_days,
            item_ttl_days=settings.conversation_ttl_days,
            max_item_bytes=settings.store_max_item_bytes,
        )
    return SqliteStore(settings.sqlite_path, max_item_bytes=settings.store_max_item_bytes)


def build_coordinator(settings: Settings) -> Coordinator:
    if settings.shared_job_store:
        from cluster.postgres import PostgresCoordinator

        # Issue 18: PARTITIONS / PARTITION_LEASE_SECONDS / PARTITION_RENEW_SECONDS.
        return PostgresCoordinator(settings.coordination_url, partitions=settings.partitions,
                                   lease=settings.partition_lease_seconds, renew=settings.partition_renew_seconds,
                                   application_name=f"teams-agent {settings.role}")
    return LocalCoordinator()


def build_ingest_limits(settings: Settings, store: ConversationStore) -> IngestLimits:
    return IngestLimits(store, user_burst=settings.rate_limit_user_burst,
                        user_per_minute=settings.rate_limit_user_per_minute,
                        conversation_burst=settings.rate_limit_conversation_burst,
                        conversation_per_minute=settings.rate_limit_conversation_per_minute,
                        max_pending_events=settings.max_pending_events,
                        sole_ingest=settings.sole_ingest)


def build_budget(settings: Settings, store: ConversationStore) -> TokenBudget:
    return TokenBudget(store, per_tenant=settings.daily_token_budget_per_tenant,
                       per_conversation=settings.daily_token_budget_per_conversation)


def create_app(settings: Settings, store: ConversationStore | None = None,
               coordinator: Coordinator | None = None) -> web.Application:
    """The bot (the half ``settings.role`` names) as an aiohttp app; ``store`` and ``coordinator``
    override the configured ones (tests)."""
    store = store or build_store(settings)
    coordinator = coordinator or build_coordinator(settings)
    model_client = create_model_client(settings, offline_run_phrase=settings.local_mode)
    offline = isinstance(model_client, OfflineChatCompletionClient)
    tool_policy = ToolPolicy.from_settings(settings.enabled_tools, settings.disabled_tools, settings.tool_policy_file)
    if tool_policy != ToolPolicy():
        log.info("tool policy: %s", tool_policy.describe())
    job_access = JobAccess(settings.admins)
    job_caps = JobCaps(settings.max_active_jobs_per_conversation, settings.max_active_jobs_per_user)
    declared = load_tool_modules(settings.tool_modules)  # TOOL_MODULES: each tool declared with @tool
    registry = JobRegistry([t for t in declared if t.long_running])
    plain_tools = [t for t in declared if not t.long_running]
    examples = [t.example for t in declared if t.example]
    # Issue 16: APPROVAL_REQUIRED_TOOLS / APPROVERS / APPROVAL_TIMEOUT_HOURS (a plain tool named: ConfigError).
    approval = ApprovalPolicy.of(settings.approval_required_tools, settings.approvers, settings.approval_timeout_hours)
    for warning in approval.check_tools(declared):
        log.warning(warning)
    if isinstance(model_client, OfflineChatCompletionClient):
        model_client.learn(declared)
    mcp_hub = McpHub(load_mcp_config(settings.mcp_config))
    adapter = create_adapter(settings)
    service_urls = ServiceUrlPolicy.from_settings(settings)  # TRUSTED_SERVICE_URLS: edge, handler and sender
    sender = ProactiveSender(adapter, settings.app_id, service_urls=service_urls,
                             timeout=settings.connector_timeout_seconds,
                             per_conversation_per_second=settings.send_rate_per_conversation)

    # The worker's half: jobs and the agent, of the conversations whose partitions this worker owns.
    wakeups = Wakeups()  # held until the worker's services are up, then the processor's
    card_updater = JobCardUpdater(store, sender)
    ownership = coordinator.ownership
    scheduler = JobScheduler(settings.effective_job_store_url,
                             partitions=ownership if settings.shared_job_store else None)  # a job store each
    job_runner = JobRunner(store, registry, card_updater.after_final_card(wakeups.wake),
                           progress_listener=card_updater.job_changed,
                           scheduler=scheduler, max_result_chars=settings.max_tool_result_chars, owner=ownership)
    runner = AgentTurnRunner(
        model_client,
        lambda scope: tool_policy.tools_for(scope.requester, [
            *turn_tools(scope, registry, store, job_runner, job_caps, job_access, plain_tools, approval),
            *mcp_hub.agent_tools()]),
        context_messages=settings.context_messages,
        system_message=settings.agent_system_prompt or DEFAULT_SYSTEM_MESSAGE,
        budget=None if offline else build_budget(settings, store),  # the offline model costs nothing
        max_tool_result_chars=settings.max_tool_result_chars,
    )
    # Issue 15: answers stream in one-on-one Teams chats (STREAMING); the outbox's final messages close
    # the streams, and every model-written message that goes out can take feedback.
    feedback = Feedback(store)
    streams = TeamsReplyStreams(sender, first_delay=FIRST_INDICATOR_DELAY, interval=settings.stream_interval_seconds,
                                max_seconds=settings.stream_max_seconds) if settings.streaming else None
    processor = ConversationProcessor(
        store, runner, FinalMessages(sender, on_ai_sent=feedback.message_sent),
        welcome=lambda: welcome_activity(offline, examples=examples),
        schedule_job=scheduler.schedule,
        job_card=card_for_activity, on_card_sent=card_updater.card_posted,  # a job awaiting approval: its card
        streams=streams, stream_seconds=settings.stream_max_seconds,
        owner=ownership,
    )
    worker = Worker(coordinator, wakeups, processor, job_runner, scheduler, registry, mcp_hub, card_updater, store,
                    retention_days=settings.conversation_ttl_days,
                    sweep_seconds=settings.work_sweep_seconds if settings.shared_job_store else None)

    # The web half: the edge posts to the inbox and wakes the conversation's worker, wherever it runs.
    inbox = Inbox(store, coordinator.wake)
    cancel_job = JobCancels(store, job_runner, job_access, tell_worker=coordinator.cancel).cancel
    commands = CommandDialogs(ConversationState(ConversationStoreStorage(store, sole_writer=settings.sole_ingest)),
                              functools.partial(help_text, settings.model_description, offline, declared),
                              on_reset=functools.partial(request_reset, inbox),
                              list_jobs=store.list_jobs, cancel_job=cancel_job,
                              jobs_card=lambda jobs, viewer: jobs_list_card(jobs, viewer=viewer))
    approvals = ApprovalClicks(Approvals(store, inbox, approval, on_decided=card_updater.job_changed))
    bot = TeamsBot(store, inbox, commands, cancel_job, service_urls=service_urls,
                   tenants=TenantPolicy(settings.allowed_tenants), limits=build_ingest_limits(settings, store),
                   approvals=approvals, feedback=feedback)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    readiness = ops.Readiness(settings, store, coordinator, scheduler)
    app[SERVICES] = Services(settings, store, coordinator, scheduler, readiness)
    if settings.serves_web:  # a worker answers only health, readiness and metrics
        app.router.add_post("/api/messages", messages_handler(
            adapter, bot, service_urls=service_urls, body_read_timeout=settings.body_read_timeout_seconds,
            max_json_depth=settings.max_json_depth))
    app.router.add_get("/healthz", ops.healthz)

    # One cleanup context per resource: started in this order, stopped in reverse (tracing last: it
    # flushes the spans); one that failed to open is not closed, those opened before it are.
    app.cleanup_ctx.append(resource("tracing", close=functools.partial(asyncio.to_thread, tracing.shutdown)))
    app.cleanup_ctx.append(resource("the conversation store", open=store.open, close=store.close,
                                    check="COSMOS_ENDPOINT / COSMOS_KEY, or DATA_DIR for SQLite"))
    app.cleanup_ctx.append(resource("the coordination database", open=coordinator.open, close=coordinator.close,
                                    check="JOB_STORE_URL", quiet_close=True))  # closing it hands the role on
    app.cleanup_ctx.append(resource("the model client", close=model_client.close))
    app.cleanup_ctx.append(resource("the Bot Connector session", close=sender.close))  # after the worker stopped
    if settings.runs_worker:
        app.cleanup_ctx.append(functools.partial(worker_services, worker))
        app.cleanup_ctx.append(functools.partial(standby, worker))
    # After the rest: a separate ops listener starts once the stores are open. OPS_TOKEN / OPS_PORT.
    ops_routes: dict[str, ops.Handler] = {
        "/readyz": readiness.readyz, "/metrics": ops.metrics_handler(functools.partial(metrics.refresh_jobs, store))}
    if settings.ops_token or settings.local_mode:  # people's comments: never on an open port outside local mode
        ops_routes["/feedback"] = feedback.endpoint
    ops.serve_ops_endpoints(app, ops_routes,
                            token=settings.ops_token, host=settings.ops_host, port=settings.ops_port)
    return app


async def worker_services(worker: Worker, app: web.Application) -> AsyncIterator[None]:
    """The worker's services, started now (joining the partition leases at once when the coordination
    database answers); stopped on shutdown (also when they were started later, by :func:`standby`)."""
    async with starting(app):
        await worker.lead(wait=False)
    yield
    await worker.stop()


async def standby(worker: Worker, _: web.Application) -> AsyncIterator[None]:
    """While the coordination database did not answer at start-up: keep trying to join in the
    background; stop trying on shutdown."""
    waiting = None if worker.leading else worker.stand_by()
    yield
    if waiting is not None:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


def log_ready(services: Services) -> None:
    """Once listening: what runs where, the messaging endpoint and, in local mode, what to do next."""
    settings = services.settings
    standby = ""
    if settings.runs_worker and not services.coordinator.active:
        standby = " (no partitions yet: joining the other workers)"
    log.info(
        "ready on port %d (host %s) as %s%s: %s store, %s job store, %s, %s mode",
        settings.port, settings.listen_host, settings.role, standby, type(services.store).__name__,
        "PostgreSQL" if settings.shared_job_store else "SQLite", settings.model_description,
        "local (no auth)" if settings.local_mode else "authenticated",
    )
    if not settings.serves_web:
        return
    host = "127.0.0.1" if settings.listen_host in ("", "0.0.0.0", "::") else settings.listen_host
    url = f"http://{f'[{host}]' if ':' in host else host}:{settings.port}/api/messages"
    log.info("messaging endpoint: %s", url)
    if settings.local_mode:
        log.info("next: chat with the bot in the Agents Playground: %s (or open %s in the Bot Framework Emulator)",
                 PLAYGROUND.format(url=url), url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Durable AI agent for Microsoft Teams")
    parser.add_argument("--port", type=int, help="overrides PORT")
    parser.add_argument("--role", choices=("all", "web", "worker"),
                        help="overrides ROLE: web (ingest), worker (agent, jobs, sends) or all (both; the default)")
    args = parser.parse_args(argv)
    overrides = {name: str(value) for name, value in (("PORT", args.port), ("ROLE", args.role)) if value}
    try:
        settings = Settings.from_env({**os.environ, **overrides} if overrides else None)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    for warning in settings.security_warnings:
        log.warning(warning)
    tracing.setup(settings.role)
    for noisy in ("apscheduler", "msrest", "azure", "httpx", "autogen_agentchat"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # AutoGen logs every model failure as a long traceback; AgentError logs it classified, once.
    logging.getLogger("autogen_core").setLevel(logging.CRITICAL)
    try:
        app = create_app(settings)
    except (McpConfigError, ConfigError, ToolPolicyError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        web.run_app(app, host=settings.listen_host, port=settings.port,
                    print=lambda _: log_ready(app[SERVICES]))  # called once the port is bound
    except (StartupError, OSError) as exc:  # one line; the traceback only with LOG_LEVEL=DEBUG
        if not isinstance(exc, StartupError):  # binding the port: in use, or a host not on this machine
            exc = StartupError(f"could not listen on {settings.listen_host}:{settings.port} ({exc}); "
                               "check HOST and PORT")
        log.critical("start-up failed: %s", exc, exc_info=exc if settings.log_level == "DEBUG" else None)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
