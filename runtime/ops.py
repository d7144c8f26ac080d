"""The operations endpoints: ``/healthz``, ``/readyz`` (the readiness policy), ``/metrics``;
where they are served, and who may read them.

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

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web

from runtime import metrics
from runtime.config import Settings
from runtime.lifecycle import naming, starting

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: How long /readyz waits for the store before calling it unreachable.
READINESS_TIMEOUT = 2.0


class PointReads(Protocol):  # the conversation store
    async def get_reference(self, key: str) -> Any: ...


class Held(Protocol):  # cluster.Ownership
    partitions: int

    def held(self) -> set[int]: ...


class Coordination(Protocol):  # cluster.Coordinator
    @property
    def active(self) -> bool: ...

    @property
    def ownership(self) -> Held: ...

    async def check(self) -> str | None: ...


class Runs(Protocol):  # jobs.scheduler.JobScheduler
    @property
    def running(self) -> bool: ...


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP. Says nothing about the store (that is /readyz)."""
    return web.json_response({"status": "ok"})


def ok(check: str) -> bool:
    """Ready as far as this check goes: fine, a standby worker, or degraded but serving."""
    return check in ("ok", "standby") or check.startswith("degraded")


class Readiness:
    """Ready when the store answers, the coordination works and (on the active worker) the job
    scheduler runs. A standby worker and a web instance with degraded coordination count as ready."""

    def __init__(self, settings: Settings, store: PointReads, coordinator: Coordination, scheduler: Runs) -> None:
        self._settings = settings
        self._store = store
        self._coordinator = coordinator
        self._scheduler = scheduler

    async def checks(self, timeout: float = READINESS_TIMEOUT) -> dict[str, str]:
        """Each check by name: ``ok`` or what is wrong. Ready when every one is :func:`ok`."""
        checks: dict[str, str] = {}
        try:
            async with asyncio.timeout(timeout):
                await self._store.get_reference("__readyz__")  # one cheap point read
            checks["store"] = "ok"
        except TimeoutError:
            checks["store"] = f"no answer within {timeout:g} s"
        except Exception as exc:
            checks["store"] = f"{type(exc).__name__}: {exc}"
        if (coordination := await self._coordinator.check()) is not None:
            if coordination != "ok" and not self._settings.runs_worker:
                # A web instance still takes messages in durably; the active worker's sweep finds them.
                coordination = f"degraded: {coordination}; new messages wait for the worker's sweep"
            checks["coordination"] = coordination
        if self._settings.runs_worker:  # issue 18: every worker runs its scheduler (a job store per partition)
            checks["scheduler"] = "ok" if self._scheduler.running else "not running"
        return checks

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 when ready, else 503 with the reasons."""
        checks = await self.checks()
        ready = all(ok(value) for value in checks.values())
        if not ready:
            log.warning("not ready: %s", ", ".join(f"{name}: {value}" for name, value in checks.items()
                                                   if not ok(value)))
        elif degraded := [f"{name}: {value}" for name, value in checks.items() if value.startswith("degraded")]:
            log.warning("ready, but %s", ", ".join(degraded))
        body: dict[str, object] = {"status": "ready" if ready else "not ready", "role": self._settings.role,
                                   "active_worker": self._coordinator.active, "checks": checks}
        if self._settings.runs_worker and self._settings.shared_job_store:  # issue 18: the partitions held now
            ownership = self._coordinator.ownership
            body["partitions"] = {"held": sorted(ownership.held()), "of": ownership.partitions}
        return web.json_response(body, status=200 if ready else 503)


def metrics_handler(refresh: Callable[[], Awaitable[None]]) -> Handler:
    """Prometheus metrics (text exposition format, or OpenMetrics if the scraper asks for it),
    after ``refresh()`` (the job gauges, read from the store)."""

    async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
        await refresh()
        body, content_type = await asyncio.to_thread(metrics.render, request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    return metrics_endpoint


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


def serve_ops_endpoints(app: web.Application, routes: Mapping[str, Handler], *, token: str,
                        host: str, port: int) -> None:
    """Add the GET ``routes`` to ``app``, or with ``port`` to a listener of their own started and
    stopped with ``app`` (call this after ``app``'s other cleanup contexts: it starts after them)."""
    target = web.Application() if port else app
    for path, handler in routes.items():
        target.router.add_get(path, require_token(handler, token) if token else handler)
    if not port:
        return
    target.router.add_get("/healthz", healthz)

    async def listener(main: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(target, access_log=None)
        await runner.setup()
        try:
            async with starting(main), naming(f"the ops listener at {host}:{port}", "OPS_HOST and OPS_PORT"):
                await web.TCPSite(runner, host, port).start()
            log.info("%s served on http://%s:%d%s", ", ".join(routes), host, port,
                     " (bearer token required)" if token else "")
            yield
        finally:
            await runner.cleanup()

    app.cleanup_ctx.append(listener)
