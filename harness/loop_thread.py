"""An asyncio loop on a daemon thread, and an aiohttp server on one, for the fakes beside the bot.

The fakes (Bot Connector, chat-completions server, OpenID server, proxy, OTLP collector) serve
aiohttp apps while sync and async tests alike talk to them, so each runs its own loop on a thread
of its own: :class:`LoopServer` is their common lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self

from aiohttp import web


class LoopThread:
    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.is_running()

    def start(self, setup: Callable[[], Coroutine[Any, Any, None]], timeout: float = 10.0) -> None:
        """Start the loop, run ``setup`` on it (bind the server) and return once it is done."""
        if self._thread is not None:
            raise RuntimeError(f"{self._name} already started")
        ready = threading.Event()
        errors: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(setup())
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            loop.call_soon(ready.set)  # only once the loop runs, so stop() can always clean up
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or errors:
            self.stop()
            if errors:
                raise RuntimeError(f"{self._name} failed to start") from errors[0]
            raise TimeoutError(f"{self._name} did not start in time")

    def call_soon(self, callback: Callable[[], Any]) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(callback)

    def stop(self, cleanup: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        """Run ``cleanup`` on the loop (best effort), stop it and join the thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if cleanup is not None and loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = None


class LoopServer:
    """An aiohttp app on its own :class:`LoopThread`, at ``SCHEME://HOST:PORT``.

    Subclasses build the app (:meth:`_app`; by default every method and path goes to
    ``_handle``) and may extend :meth:`_serve` (setup before serving), :meth:`_listen` (how to
    bind) and :meth:`_shutdown` (extra cleanup). Use as ``with Server() as server:``.
    """

    scheme = "http"
    shutdown_timeout = 60.0  # aiohttp's default
    client_max_size = 1024**2  # aiohttp's default

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._bind_port = port  # 0: a free one
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None  # set on stop: pending _sleep()s end at once
        self._loop_thread = LoopThread(type(self).__name__)

    def start(self, timeout: float = 10.0) -> Self:
        """Start serving; returns self once the socket is bound."""
        self._loop_thread.start(self._serve, timeout)
        return self

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=self.client_max_size)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound()

    async def _serve(self) -> None:
        """Bind the app (runs on the background loop)."""
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=self.shutdown_timeout)
        await runner.setup()
        self._runner = runner
        self._port = await self._listen(runner)

    async def _listen(self, runner: web.AppRunner) -> int:
        """Start listening; returns the port."""
        await web.TCPSite(runner, self._host, self._bind_port).start()
        return int(runner.addresses[0][1])

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a slow answer), or less: :meth:`stop` ends the wait at once."""
        if seconds and self._stopping is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)

    def stop(self) -> None:
        """Shut the server down and join the thread; safe to call twice."""
        if self._stopping is not None:
            self._loop_thread.call_soon(self._stopping.set)
        self._loop_thread.stop(self._shutdown)
        self._runner = None
        self._port = None

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """Port the server listens on (only valid while started)."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """``SCHEME://HOST:PORT`` without trailing slash."""
        return f"{self.scheme}://{self._host}:{self.port}"
