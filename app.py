"""Composition root: Settings -> stores -> scheduler -> adapter -> bot -> aiohttp app.

Only this module picks concrete implementations; everything else receives what it needs.
Run with ``python app.py`` (``make run``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from autogen_core.models import ChatCompletionClient
from botbuilder.core import ConversationState

import logs
import metrics
from agent.mcp import McpConfigError, McpHub, load_mcp_config
from agent.models import create_model_client
from agent.offline_model import HELP_TEXT, OfflineChatCompletionClient
from agent.processor import ConversationProcessor
from agent.runner import DEFAULT_SYSTEM_MESSAGE, AgentTurnRunner
from agent.tools import turn_tools
from bot.auth import TenantPolicy
from bot.cards import job_card_activity, welcome_activity
from bot.dialog_storage import ConversationStoreStorage
from bot.edge import MAX_BODY_BYTES, create_adapter, messages_handler
from bot.handler import TeamsBot
from bot.job_cards import JobCardUpdater
from bot.sender import ProactiveSender
from config import ConfigError, Settings
from dialogs.commands import CommandDialogs
from jobs.activate_line import make_activate_line_tool
from jobs.registry import JobRegistry
from jobs.runner import JobRunner
from jobs.scheduler import JobScheduler
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
        )
    return SqliteStore(settings.sqlite_path)


def help_text(settings: Settings, offline: bool) -> str:
    if offline:
        return HELP_TEXT
    return (
        f"I'm an AI assistant ({settings.model_description}). Ask me anything; long tasks such as "
        "activating a phone line run in the background and I message you when they finish.\n\n"
        "Commands: `help`, `reset` (forget this conversation). Ask me about your jobs in plain words."
    )


def create_app(settings: Settings, store: ConversationStore | None = None) -> web.Application:
    """The whole bot as an aiohttp app; ``store`` overrides the configured one (tests)."""
    store = store or build_store(settings)
    model_client = create_model_client(settings)
    offline = isinstance(model_client, OfflineChatCompletionClient)
    registry = JobRegistry([make_activate_line_tool(settings.activate_line_seconds)])
    mcp_hub = McpHub(load_mcp_config(settings.mcp_config))
    adapter = create_adapter(settings)
    sender = ProactiveSender(adapter, settings.app_id, timeout=settings.connector_timeout_seconds)

    processor_ref: list[ConversationProcessor] = []

    def wake(key: str) -> None:
        processor_ref[0].wake(key)

    card_updater = JobCardUpdater(store, sender)
    job_runner = JobRunner(store, registry, wake, progress_listener=card_updater.job_changed)
    scheduler = JobScheduler(settings.effective_job_store_url, job_runner, store)
    runner = AgentTurnRunner(
        model_client,
        lambda scope: [*turn_tools(scope, registry, store, job_runner), *mcp_hub.agent_tools()],
        context_messages=settings.context_messages,
        system_message=settings.agent_system_prompt or DEFAULT_SYSTEM_MESSAGE,
    )
    processor = ConversationProcessor(
        store, runner, sender, welcome=lambda: welcome_activity(offline), schedule_job=scheduler.schedule,
        job_card=job_card_activity, on_card_sent=card_updater.card_posted,
    )
    processor_ref.append(processor)

    conversation_state = ConversationState(ConversationStoreStorage(store))
    bot_ref: list[TeamsBot] = []
    commands = CommandDialogs(conversation_state, lambda: help_text(settings, offline),
                              on_reset=lambda tc: bot_ref[0].request_reset(tc),
                              list_jobs=store.list_jobs, cancel_job=job_runner.cancel)
    bot = TeamsBot(store, wake, commands, job_runner.cancel, tenants=TenantPolicy(settings.allowed_tenants))
    bot_ref.append(bot)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SERVICES] = Services(settings, store, processor, job_runner, scheduler, registry, mcp_hub, model_client,
                             card_updater)
    app.router.add_post("/api/messages", messages_handler(adapter, bot))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.cleanup_ctx.append(lifecycle)
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
    checks["scheduler"] = "ok" if services.scheduler.running else "not running"
    return checks


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the store answers and the job scheduler runs (503 otherwise, with the reasons)."""
    checks = await readiness(request.app[SERVICES])
    ready = all(value == "ok" for value in checks.values())
    if not ready:
        log.warning("not ready: %s", ", ".join(f"{name}: {value}" for name, value in checks.items() if value != "ok"))
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
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


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Open stores, start the scheduler, recover unfinished work; undo it all on shutdown."""
    services = app[SERVICES]
    settings = services.settings
    await services.store.open()
    await services.mcp_hub.start()
    for tool in services.mcp_hub.long_running_tools():
        services.registry.register(tool)  # before recovery: their unfinished jobs resume
    await services.scheduler.start()
    recovered_jobs = await services.scheduler.recover()
    recovered_conversations = await services.processor.recover()
    log.info(
        "ready on port %d: %s store, %s, %s mode; recovered %d job(s), %d conversation(s)",
        settings.port, type(services.store).__name__, settings.model_description,
        "local (no auth)" if settings.local_mode else "authenticated", recovered_jobs, recovered_conversations,
    )
    purge = asyncio.create_task(purge_periodically(services.store, settings.conversation_ttl_days))
    yield
    purge.cancel()
    await services.processor.close()
    await services.job_runner.shutdown()
    await services.card_updater.close()
    await services.mcp_hub.stop()
    await services.model_client.close()
    await services.scheduler.shutdown()
    await services.store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Durable AI agent for Microsoft Teams")
    parser.add_argument("--port", type=int, help="overrides PORT")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    for noisy in ("apscheduler", "msrest", "azure", "httpx", "autogen_agentchat"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # AutoGen logs every model failure as a long traceback; AgentError logs it classified, once.
    logging.getLogger("autogen_core").setLevel(logging.CRITICAL)
    port = args.port or settings.port
    try:
        app = create_app(settings)
    except McpConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    web.run_app(app, host=settings.host, port=port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
