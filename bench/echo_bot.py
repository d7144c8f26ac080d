"""The baseline: a bare botbuilder echo bot, as in Microsoft's samples.

Same SDK as the real bot (``CloudAdapter`` + ``ConfigurationBotFrameworkAuthentication`` on
aiohttp), no store, no agent, no queue: it answers inside the request with
``turn_context.send_activity``. The benchmarks start it as a real process, exactly like the
app (``PORT`` from the environment, ``GET /healthz``), and drive both with the same load
generator and the same recording connector, so ``ours / echo`` is the cost of the durable
agent itself.

One extra phrase serves as the baseline of the completion-notification benchmark:
``notify <seconds> <tag>`` answers ``ok`` at once, then after ``seconds`` sends a proactive
``done <tag> <unix time>`` through ``continue_conversation``, the unix time being when the
timer fired (the bare-bones "job finished, tell the user").

Run: ``PORT=3979 python bench/echo_bot.py``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from aiohttp import web
from botbuilder.core import ActivityHandler, MessageFactory, TurnContext
from botbuilder.integration.aiohttp import CloudAdapter, ConfigurationBotFrameworkAuthentication
from botbuilder.schema import ConversationReference


class DefaultConfig:
    """The attribute names ConfigurationBotFrameworkAuthentication reads (blank id = local mode)."""

    PORT = int(os.environ.get("PORT", "3979"))
    APP_ID = os.environ.get("MicrosoftAppId", "")
    APP_PASSWORD = os.environ.get("MicrosoftAppPassword", "")
    APP_TYPE = os.environ.get("MicrosoftAppType", "MultiTenant")
    APP_TENANTID = os.environ.get("MicrosoftAppTenantId", "")


CONFIG = DefaultConfig()
ADAPTER = CloudAdapter(ConfigurationBotFrameworkAuthentication(CONFIG))
_timers: set[asyncio.Task[None]] = set()


async def _notify_later(reference: ConversationReference, seconds: float, tag: str) -> None:
    await asyncio.sleep(seconds)
    finished = time.time()

    async def send(turn_context: TurnContext) -> None:
        await turn_context.send_activity(MessageFactory.text(f"done {tag} {finished:.6f}"))

    await ADAPTER.continue_conversation(reference, send, CONFIG.APP_ID)


class EchoBot(ActivityHandler):
    async def on_message_activity(self, turn_context: TurnContext) -> None:
        text = turn_context.activity.text or ""
        parts = text.split()
        if len(parts) == 3 and parts[0] == "notify":
            reference = TurnContext.get_conversation_reference(turn_context.activity)
            task = asyncio.create_task(_notify_later(reference, float(parts[1]), parts[2]))
            _timers.add(task)
            task.add_done_callback(_timers.discard)
            await turn_context.send_activity(MessageFactory.text("ok"))
            return
        await turn_context.send_activity(MessageFactory.text(f"Echo: {text}"))


BOT = EchoBot()


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
