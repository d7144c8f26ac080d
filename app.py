"""Composition root: Settings -> stores -> scheduler -> adapter -> bot -> aiohttp app.

Only this module picks concrete implementations; everything else receives what it needs.
Run with ``python app.py`` (``make run``); ``--role web|worker`` splits the two halves over
several processes that share the stores (docs/deployment.md):

- web: ``/api/messages``: ingest, card invokes and commands, answered from the shared store;
- worker: inboxes (the agent), jobs (APScheduler) and proactive sends, on the one *active*
  worker at a time (cluster/); standbys wait to take over;
- all (default): both in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web
from autogen_core.models import ChatCompletionClient
from botbuilder.core import ConversationState

from agent.budget import TokenBudget
from agent.events import Requester
from agent.mcp import McpConfigError, McpHub, load_mcp_config
from agent.models import create_model_client
from agent.offline_model import HELP_TEXT, OfflineChatCompletionClient
from agent.processor import ConversationProcessor
from agent.runner import DEFAULT_SYSTEM_MESSAGE, AgentTurnRunner
from agent.tool_policy import ToolPolicy, ToolPolicyError
from agent.tools import turn_tools
from bot.auth import TenantPolicy
from bot.cards import job_card_activity, welcome_activity
from bot.dialog_storage import ConversationStoreStorage
from bot.edge import MAX_BODY_BYTES, create_adapter, messages_handler
from bot.handler import TeamsBot
from bot.job_cards import JobCardUpdater
from bot.rate_limits import IngestLimits
from bot.sender import ProactiveSender
from bot.service_urls import ServiceUrlPolicy
from cluster import Coordinator, LocalCoordinator
from dialogs.commands import CommandDialogs
from jobs.access import CancelRefusedError, JobAccess
from jobs.activate_line import make_activate_line_tool
from jobs.caps import JobCaps
from jobs.registry import JobRegistry
from jobs.runner import CancelResult, JobRunner
from jobs.scheduler import JobScheduler
from runtime import logs, metrics, ops, tracing
from runtime.config import ConfigError, Settings
from storage.abc import ConversationStore
from storage.sqlite import SqliteStore

log = logging.getLogger("app")


@dataclass
class Services:
    settings: Settings
    store: ConversationStore
    processor: ConversationProcessor
    job_runner: JobRunner
    scheduler: JobScheduler
    registry: JobRegistry
    mcp_hub: McpHub
    model_client: ChatCompletionClient
    card_updater: JobCardUpdater
    coordinator: Coordinator
    #: The active worker's background loops (sweep, retention), and the standby's wait.
    tasks: list[asyncio.Task[object]] = field(default_factory=list)
    worker_started: bool = False


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

        return PostgresCoordinator(settings.coordination_url, application_name=f"teams-agent {settings.role}")
    return LocalCoordinator()


def build_ingest_limits(settings: Settings, store: ConversationStore) -> IngestLimits:
    return IngestLimits(store, user_burst=settings.rate_limit_user_burst,
                        user_per_minute=settings.rate_limit_user_per_minute,
                        conversation_burst=settings.rate_limit_conversation_burst,
                        conversation_per_minute=settings.rate_limit_conversation_per_minute,
                        max_pending_events=settings.max_pending_events)


def build_budget(settings: Settings, store: ConversationStore) -> TokenBudget:
    return TokenBudget(store, per_tenant=settings.daily_token_budget_per_tenant,
                       per_conversation=settings.daily_token_budget_per_conversation)


def help_text(settings: Settings, offline: bool) -> str:
    if offline:
        return HELP_TEXT
    return (
        f"I'm an AI assistant ({settings.model_description}). Ask me anything; long tasks such as "
        "activating a phone line run in the background and I message you when they finish.\n\n"
        "Commands: `help`, `reset` (forget this conversation). Ask me about your jobs in plain words."
    )


def create_app(settings: Settings, store: ConversationStore | None = None,
               coordinator: Coordinator | None = None) -> web.Application:
    """The bot (the half ``settings.role`` names) as an aiohttp app; ``store`` and ``coordinator``
    override the configured ones (tests)."""
    store = store or build_store(settings)
    coordinator = coordinator or build_coordinator(settings)
    model_client = create_model_client(settings, offline_run_phrase=settings.local_mode)
    tool_policy = ToolPolicy.from_settings(settings.enabled_tools, settings.disabled_tools, settings.tool_policy_file)
    if tool_policy != ToolPolicy():
        log.info("tool policy: %s", tool_policy.describe())
    job_access = JobAccess(settings.admins)
    job_caps = JobCaps(settings.max_active_jobs_per_conversation, settings.max_active_jobs_per_user)
    offline = isinstance(model_client, OfflineChatCompletionClient)
    registry = JobRegistry([make_activate_line_tool(settings.activate_line_seconds)])
    mcp_hub = McpHub(load_mcp_config(settings.mcp_config))
    adapter = create_adapter(settings)
    service_urls = ServiceUrlPolicy.from_settings(settings)  # TRUSTED_SERVICE_URLS: edge, handler and sender
    sender = ProactiveSender(adapter, settings.app_id, service_urls=service_urls,
                             timeout=settings.connector_timeout_seconds)

    processor_ref: list[ConversationProcessor] = []

    def wake_here(key: str) -> None:  # jobs run on the active worker, beside the processor
        processor_ref[0].wake(key)

    card_updater = JobCardUpdater(store, sender)
    job_runner = JobRunner(store, registry, card_updater.after_final_card(wake_here),
                           progress_listener=card_updater.job_changed,
                           max_result_chars=settings.max_tool_result_chars)
    scheduler = JobScheduler(settings.effective_job_store_url, job_runner, store)
    runner = AgentTurnRunner(
        model_client,
        lambda scope: tool_policy.tools_for(scope.requester, [
            *turn_tools(scope, registry, store, job_runner, job_caps, job_access), *mcp_hub.agent_tools()]),
        context_messages=settings.context_messages,
        system_message=settings.agent_system_prompt or DEFAULT_SYSTEM_MESSAGE,
        budget=None if offline else build_budget(settings, store),  # the offline model costs nothing
        max_tool_result_chars=settings.max_tool_result_chars,
    )
    processor = ConversationProcessor(
        store, runner, sender, schedule_job=scheduler.schedule,
        welcome=lambda: welcome_activity(offline, examples=["activate line 555-0100"]),
        job_card=job_card_activity, on_card_sent=card_updater.card_posted,
    )
    processor_ref.append(processor)

    async def cancel_job(key: str, job_id: str, requester: Requester) -> CancelResult:
        """A user's cancel, taken by any instance: recorded in the store, carried out by the active worker.
        Only the job's starter or an admin may (else CancelRefusedError, and nothing changes)."""
        try:
            job_access.check_cancel(await store.get_job(key, job_id), requester)
        except CancelRefusedError:
            metrics.CANCELS_REFUSED.inc()
            raise
        result = await job_runner.request_cancel(key, job_id)
        if result.already_finished:
            return result
        await coordinator.cancel(key, job_id)
        return CancelResult(await store.get_job(key, job_id), already_finished=False)

    conversation_state = ConversationState(ConversationStoreStorage(store))
    bot_ref: list[TeamsBot] = []
    commands = CommandDialogs(conversation_state, lambda: help_text(settings, offline),
                              on_reset=lambda tc: bot_ref[0].request_reset(tc),
                              list_jobs=store.list_jobs, cancel_job=cancel_job)
    bot = TeamsBot(store, coordinator.wake, commands, cancel_job, service_urls=service_urls,
                   tenants=TenantPolicy(settings.allowed_tenants), limits=build_ingest_limits(settings, store))
    bot_ref.append(bot)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SERVICES] = Services(settings, store, processor, job_runner, scheduler, registry, mcp_hub, model_client,
                             card_updater, coordinator)
    if settings.serves_web:  # a worker answers only health, readiness and metrics
        app.router.add_post("/api/messages", messages_handler(
            adapter, bot, service_urls=service_urls, body_read_timeout=settings.body_read_timeout_seconds,
            max_json_depth=settings.max_json_depth))
    app.router.add_get("/healthz", healthz)
    app.cleanup_ctx.append(lifecycle)
    # After lifecycle: a separate ops listener starts once the stores are open. OPS_TOKEN / OPS_PORT.
    ops.serve_ops_endpoints(app, {"/readyz": readyz, "/metrics": metrics_endpoint}, healthz=healthz,
                            token=settings.ops_token, host=settings.ops_host, port=settings.ops_port,
                            shared={SERVICES: app[SERVICES]})
    return app


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP. Says nothing about the store (that is /readyz)."""
    return web.json_response({"status": "ok"})


#: How long /readyz waits for the store before calling it unreachable.
READINESS_TIMEOUT = 2.0


async def readiness(services: Services, timeout: float = READINESS_TIMEOUT) -> dict[str, str]:
    """Each check by name: ``ok`` or what is wrong. Ready when every one is ``ok``."""
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(timeout):
            await services.store.get_reference("__readyz__")  # one cheap point read
        checks["store"] = "ok"
    except TimeoutError:
        checks["store"] = f"no answer within {timeout:g} s"
    except Exception as exc:
        checks["store"] = f"{type(exc).__name__}: {exc}"
    if (coordination := await services.coordinator.check()) is not None:
        if coordination != "ok" and not services.settings.runs_worker:
            # A web instance still takes messages in durably; the active worker's sweep finds them.
            coordination = f"degraded: {coordination}; new messages wait for the worker's sweep"
        checks["coordination"] = coordination
    if services.settings.runs_worker:
        if services.coordinator.active or not services.settings.shared_job_store:
            checks["scheduler"] = "ok" if services.scheduler.running else "not running"
        else:
            checks["scheduler"] = "standby"  # another worker is active; this one is ready to take over
    return checks


def ok(check: str) -> bool:
    """Ready as far as this check goes: fine, a standby worker, or degraded but serving."""
    return check in ("ok", "standby") or check.startswith("degraded")


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the store answers and the job scheduler runs (503 otherwise, with the reasons)."""
    services = request.app[SERVICES]
    checks = await readiness(services)
    ready = all(ok(value) for value in checks.values())
    if not ready:
        log.warning("not ready: %s", ", ".join(f"{name}: {value}" for name, value in checks.items() if not ok(value)))
    elif degraded := [f"{name}: {value}" for name, value in checks.items() if value.startswith("degraded")]:
        log.warning("ready, but %s", ", ".join(degraded))
    return web.json_response({"status": "ready" if ready else "not ready", "role": services.settings.role,
                              "active_worker": services.coordinator.active, "checks": checks},
                             status=200 if ready else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus metrics (text exposition format, or OpenMetrics if the scraper asks for it)."""
    await metrics.refresh_jobs(request.app[SERVICES].store)
    body, content_type = await asyncio.to_thread(metrics.render, request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def purge_periodically(store: ConversationStore, ttl_days: int, every: float = 3600.0) -> None:
    """Retention for stores without server-side TTL (SQLite): hourly, drop what expired."""
    while True:
        try:
            removed = await store.purge_expired(time.time() - ttl_days * 86400)
            if removed:
                log.info("retention: removed %d item(s) untouched for %d days", removed, ttl_days)
        except Exception:
            log.exception("retention purge failed; it runs again in an hour")
        await asyncio.sleep(every)


async def sweep_periodically(processor: ConversationProcessor, every: float) -> None:
    """The active worker's safety net for lost wake-ups (NOTIFY is fire-and-forget): look for
    conversations with pending events or unsent messages every ``every`` seconds."""
    while True:
        await asyncio.sleep(every)
        try:
            found = await processor.recover(sweep=True)
            if found:
                metrics.WAKEUPS.labels("sweep").inc(found)
        except Exception as exc:
            log.warning("looking for missed work failed (%s); looking again in %.0f s", exc, every)


async def start_worker(services: Services) -> None:
    """This process became the active worker: tools, scheduler, recovery, background loops."""
    services.worker_started = True
    settings = services.settings
    await services.mcp_hub.start()
    for tool in services.mcp_hub.long_running_tools():
        services.registry.register(tool)  # before recovery: their unfinished jobs resume
    await services.scheduler.start()
    recovered_jobs = await services.scheduler.recover()
    recovered_conversations = await services.processor.recover()
    log.info("active worker: recovered %d job(s), %d conversation(s)", recovered_jobs, recovered_conversations)
    services.tasks.append(asyncio.create_task(
        purge_periodically(services.store, settings.conversation_ttl_days), name="retention"))
    if settings.shared_job_store:
        services.tasks.append(asyncio.create_task(
            sweep_periodically(services.processor, settings.work_sweep_seconds), name="sweep"))


async def lead(services: Services, *, wait: bool) -> bool:
    """Become the active worker (waiting for it if ``wait``) and start the worker's services.

    Wake-ups start arriving as soon as the lock is ours, before the scheduler runs: they are
    held until the services are up (a turn must not create a job nobody can schedule yet).
    """
    held: set[str] | None = set()

    def on_wake(key: str) -> None:
        if held is None:
            services.processor.wake(key)
        else:
            held.add(key)

    if not await services.coordinator.lead(on_wake, services.job_runner.apply_cancel, wait=wait):
        return False
    await start_worker(services)
    early, held = held or set(), None
    for key in early:
        services.processor.wake(key)
    return True


def stop_if_takeover_failed(task: asyncio.Task[bool]) -> None:
    """A standby that won the lock but could not start its services must not sit on the lock:
    stop gracefully (releasing it) and let the supervisor restart this process."""
    if task.cancelled() or task.exception() is None:
        return
    log.critical("could not take over as the active worker (%s); stopping so that another worker can",
                 task.exception(), exc_info=task.exception())
    os.kill(os.getpid(), signal.SIGTERM)


async def stop_worker(services: Services) -> None:
    await services.processor.close()
    await services.job_runner.shutdown()
    await services.card_updater.close()
    await services.mcp_hub.stop()
    await services.scheduler.shutdown()


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Open stores, take the worker's part (at once, or as a standby), undo it all on shutdown."""
    services = app[SERVICES]
    settings = services.settings
    await services.store.open()
    await services.coordinator.open()
    standby = ""
    if settings.runs_worker and not await lead(services, wait=False):
        standby = " (standby worker: another worker is active)"
        waiting = asyncio.create_task(lead(services, wait=True), name="standby")
        waiting.add_done_callback(stop_if_takeover_failed)
        services.tasks.append(waiting)
    log.info(
        "ready on port %d (host %s) as %s%s: %s store, %s job store, %s, %s mode",
        settings.port, settings.listen_host, settings.role, standby, type(services.store).__name__,
        "PostgreSQL" if settings.shared_job_store else "SQLite", settings.model_description,
        "local (no auth)" if settings.local_mode else "authenticated",
    )
    yield
    for task in services.tasks:
        task.cancel()
    await asyncio.gather(*services.tasks, return_exceptions=True)
    if services.worker_started:
        await stop_worker(services)
    await services.model_client.close()
    # Last: a standby takes over the moment this releases the lock, after running jobs were handed back.
    with contextlib.suppress(Exception):
        await services.coordinator.close()
    await services.store.close()
    await asyncio.to_thread(tracing.shutdown)  # flushes buffered spans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Durable AI agent for Microsoft Teams")
    parser.add_argument("--port", type=int, help="overrides PORT")
    parser.add_argument("--role", choices=("all", "web", "worker"),
                        help="overrides ROLE: web (ingest), worker (agent, jobs, sends) or all (both; the default)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env({**os.environ, "ROLE": args.role} if args.role else None)
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
    port = args.port or settings.port
    try:
        app = create_app(settings)
    except (McpConfigError, ConfigError, ToolPolicyError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    web.run_app(app, host=settings.listen_host, port=port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
