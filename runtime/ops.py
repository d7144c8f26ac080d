"""Where the operations endpoints (``/readyz``, ``/metrics``) are served, and who may read them.

They tell whoever reads them how the bot is doing (store errors, job counts, tool names), so a
deployment reachable from outside can keep them from the public:

- ``OPS_TOKEN``: they answer only requests with ``Authorization: Bearer <OPS_TOKEN>`` (else 401);
- ``OPS_PORT``: they leave the main port for a listener of their own at ``OPS_HOST:OPS_PORT``
  (``OPS_HOST`` defaults to 127.0.0.1: a sidecar or the orchestrator's probes on the same host).

Both may be combined. Unset (the default), they stay open on the main port, as before.
``/healthz`` says only "the process serves HTTP" and always stays open on the main port (the
Docker HEALTHCHECK and liveness probes use it); the ops listener answers it too.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def require_token(handler: Handler, token: str) -> Handler:
    """``handler``, answering 401 unless the request carries ``Authorization: Bearer <token>``."""
    expected = f"Bearer {token}".encode()

    async def guarded(request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").strip().encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response({"error": "unauthorized", "details": ["send Authorization: Bearer <OPS_TOKEN>"]},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return guarded


def serve_ops_endpoints(app: web.Application, routes: Mapping[str, Handler], *, healthz: Handler, token: str,
                        host: str, port: int, shared: Mapping[web.AppKey[Any], Any]) -> None:
    """Add the GET ``routes`` to ``app``, or with ``port`` to a listener of their own started and
    stopped with ``app`` (call this after ``app``'s other cleanup contexts: it starts after them);
    ``shared`` are the app keys the handlers read."""
    target = web.Application() if port else app
    for path, handler in routes.items():
        target.router.add_get(path, require_token(handler, token) if token else handler)
    if not port:
        return
    for key, value in shared.items():
        target[key] = value
    target.router.add_get("/healthz", healthz)

    async def listener(_: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(target, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            log.info("%s served on http://%s:%d%s", ", ".join(routes), host, port,
                     " (bearer token required)" if token else "")
            yield
        finally:
            await runner.cleanup()

    app.cleanup_ctx.append(listener)
