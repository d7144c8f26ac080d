"""An asyncio loop on a daemon thread, for the fake servers the tests run beside the bot.

The fakes (Bot Connector, chat-completions server, OpenID server) serve aiohttp apps while sync
and async tests alike talk to them, so each runs its own loop on a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any


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
