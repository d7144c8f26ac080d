"""The second baseline: the naive agent bot, a plain botbuilder bot with the same agent inside.

What a developer gets from Microsoft's samples plus an AutoGen agent: ``CloudAdapter`` +
``ConfigurationBotFrameworkAuthentication`` on aiohttp, an ``ActivityHandler`` that runs the
agent **inside the request** and answers with ``turn_context.send_activity``, and the agent's
state in botbuilder's ``ConversationState`` over ``MemoryStorage`` (saved with
``save_changes`` at the end of the turn). No inbox, no outbox, no commit: a crash loses every
conversation, a redelivery is answered twice, a reply the connector refused is gone.

The agent is the real bot's, unchanged: the same ``AgentTurnRunner`` (the AutoGen team, its
context bounds and state pruning), the same offline model, the same turn tools from the same
default ``TOOL_MODULES``; so ``ours / naive`` is the price of durability alone. Its job tools
get an in-memory store they never use here (the benchmark sends no job request). Like the
real bot's edge (``bot/edge.py``) it turns msrest's retry-code list into a frozenset, a fix
any bot can apply, so that fix is not counted as durability either (the echo bot, the stock
sample, stays unpatched).

Run: ``PORT=3979 python bench/naive_bot.py`` (the benchmarks start it like the app).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from botbuilder.core import ActivityHandler, ConversationState, MemoryStorage, MessageFactory, TurnContext
from botbuilder.integration.aiohttp import CloudAdapter, ConfigurationBotFrameworkAuthentication
from msrest.universal_http.requests import ClientRetryPolicy

from agent.offline_model import OfflineChatCompletionClient
from agent.runner import AgentTurnRunner
from agent.tools import turn_tools
from agent.turns import AgentError, AgentInput
from jobs.registry import JobRegistry, load_tool_modules
from jobs.runner import JobRunner
from runtime.protocol import Requester
from storage.memory import MemoryStore

ClientRetryPolicy.safe_codes = frozenset(ClientRetryPolicy.safe_codes)  # type: ignore[assignment]


class DefaultConfig:
    """The attribute names ConfigurationBotFrameworkAuthentication reads (blank id = local mode)."""

    PORT = int(os.environ.get("PORT", "3979"))
    APP_ID = os.environ.get("MicrosoftAppId", "")
    APP_PASSWORD = os.environ.get("MicrosoftAppPassword", "")
    APP_TYPE = os.environ.get("MicrosoftAppType", "MultiTenant")
    APP_TENANTID = os.environ.get("MicrosoftAppTenantId", "")


def build_runner() -> AgentTurnRunner:
    """The real bot's agent, built as app.py builds it (default settings, offline model)."""
    declared = load_tool_modules(("jobs.activate_line",))
    registry = JobRegistry([t for t in declared if t.long_running])
    plain = [t for t in declared if not t.long_running]
    model = OfflineChatCompletionClient()
    model.learn(declared)
    unused = MemoryStore()  # the job tools need one; no job is started in this benchmark
    jobs = JobRunner(unused, registry, lambda key: None)
    return AgentTurnRunner(model, lambda scope: turn_tools(scope, registry, unused, jobs, plain=plain))


class NaiveAgentBot(ActivityHandler):
    def __init__(self, conversation_state: ConversationState, runner: AgentTurnRunner) -> None:
        self._conversation_state = conversation_state
        self._agent_state = conversation_state.create_property("AgentState")
        self._runner = runner

    async def on_turn(self, turn_context: TurnContext) -> None:
        await super().on_turn(turn_context)
        await self._conversation_state.save_changes(turn_context)

    async def on_message_activity(self, turn_context: TurnContext) -> None:
        activity = turn_context.activity
        data: dict[str, Any] = await self._agent_state.get(turn_context, dict)
        sender = activity.from_property
        item = AgentInput(text=activity.text or "(an empty message)",
                          requester=Requester(id=str(getattr(sender, "id", "") or ""),
                                              name=str(getattr(sender, "name", "") or "")))
        try:
            outcome = await self._runner.run(activity.conversation.id, data.get("team"), [item])
        except AgentError as exc:
            await turn_context.send_activity(MessageFactory.text(exc.user_message))
            return
        data["team"] = outcome.state
        for text in outcome.replies:
            await turn_context.send_activity(MessageFactory.text(text))


CONFIG = DefaultConfig()
ADAPTER = CloudAdapter(ConfigurationBotFrameworkAuthentication(CONFIG))
BOT = NaiveAgentBot(ConversationState(MemoryStorage()), build_runner())


async def messages(request: web.Request) -> web.StreamResponse:
    return await ADAPTER.process(request, BOT)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> int:
    app = web.Application()
    app.router.add_post("/api/messages", messages)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=CONFIG.PORT, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
