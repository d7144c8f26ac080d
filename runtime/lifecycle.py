"""Start-up and shutdown of the app's resources, one aiohttp cleanup context each.

aiohttp runs the contexts' start-up halves in order and their shutdown halves in reverse. When
one fails to start, it is not closed, and those that started before it are closed at once
(:func:`starting`: aiohttp 3's ``web.run_app`` would leave them open). A resource that cannot be
opened raises :class:`StartupError`, which names it and the setting to check; ``app.main``
prints that as one line.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


class StartupError(Exception):
    """A resource could not be opened: ``str(error)`` is the one line to show."""


@contextlib.asynccontextmanager
async def naming(what: str, check: str) -> AsyncIterator[None]:
    """A failure inside becomes StartupError("could not open <what> (<error>); check <check>")."""
    try:
        yield
    except StartupError:
        raise
    except Exception as exc:
        raise StartupError(f"could not open {what} ({type(exc).__name__}: {exc}); check {check}") from exc


@contextlib.asynccontextmanager
async def starting(app: web.Application) -> AsyncIterator[None]:
    """The start-up half of a cleanup context: if it fails, close the contexts that started before
    it (``web.run_app`` calls ``app.cleanup()`` only after a successful start), then re-raise."""
    try:
        yield
    except BaseException:
        try:
            await app.cleanup()  # before the app is frozen: runs the shutdown half of those that started
        except Exception as exc:
            log.warning("closing what had started failed too: %s", exc)
        raise


def resource(what: str, *, open: Callable[[], Awaitable[Any]] | None = None,
             close: Callable[[], Awaitable[Any]] | None = None, check: str = "its settings",
             quiet_close: bool = False) -> CleanupContext:
    """A cleanup context that awaits ``open()`` at start-up (a failure: StartupError naming ``what``
    and the setting to ``check``) and ``close()`` at shutdown (errors swallowed if ``quiet_close``)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        if open is not None:
            async with starting(app), naming(what, check):
                await open()
        yield
        if close is None:
            return
        if quiet_close:
            with contextlib.suppress(Exception):
                await close()
        else:
            await close()

    context.__qualname__ = f"resource({what!r})"
    return context
