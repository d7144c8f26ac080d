"""app.py's wiring: one cleanup context per resource, start-up failures in one line, the ready line.

The in-process tests drive the app's start-up as ``web.run_app`` does (``AppRunner.setup``); the
others start the real app process (harness/botproc.py).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from aiohttp import web

from app import create_app
from cluster import LocalCoordinator
from harness.botproc import BotProcess, BotStartError, free_port, log_text, wait_for_log
from runtime.config import Settings
from runtime.lifecycle import StartupError
from storage.memory import MemoryStore


class TrackedStore(MemoryStore):
    def __init__(self, *, fail_open: bool = False) -> None:
        super().__init__()
        self.fail_open, self.opened, self.closed = fail_open, 0, 0

    async def open(self) -> None:
        if self.fail_open:
            raise OSError("disk on fire (injected)")
        self.opened += 1
        await super().open()

    async def close(self) -> None:
        self.closed += 1
        await super().close()


class TrackedCoordinator(LocalCoordinator):
    def __init__(self, *, fail_open: bool = False) -> None:
        super().__init__()
        self.fail_open, self.opened, self.closed = fail_open, 0, 0

    async def open(self) -> None:
        if self.fail_open:
            raise ConnectionRefusedError("connection refused (injected)")
        self.opened += 1

    async def close(self) -> None:
        self.closed += 1
        await super().close()


def settings_for(tmp_path: Path, **changes: object) -> Settings:
    return Settings(data_dir=tmp_path, mcp_config=tmp_path / "no-mcp.json", **changes)  # type: ignore[arg-type]


async def start(app: web.Application) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()  # what web.run_app does; it calls cleanup() only when this succeeded
    return runner


async def test_a_coordinator_that_cannot_open_leaves_the_store_closed(tmp_path: Path) -> None:
    store, coordinator = TrackedStore(), TrackedCoordinator(fail_open=True)
    app = create_app(settings_for(tmp_path), store=store, coordinator=coordinator)
    with pytest.raises(StartupError, match=r"^could not open the coordination database \(ConnectionRefusedError: "
                                           r"connection refused \(injected\)\); check JOB_STORE_URL$"):
        await start(app)
    assert (store.opened, store.closed) == (1, 1)  # it opened, so it was closed
    assert coordinator.closed == 0  # it never opened


async def test_a_store_that_cannot_open_is_not_closed_and_nothing_after_it_opens(tmp_path: Path) -> None:
    store, coordinator = TrackedStore(fail_open=True), TrackedCoordinator()
    app = create_app(settings_for(tmp_path), store=store, coordinator=coordinator)
    with pytest.raises(StartupError, match=r"could not open the conversation store .*disk on fire"):
        await start(app)
    assert (store.closed, coordinator.opened, coordinator.closed) == (0, 0, 0)


async def test_a_job_store_that_cannot_open_closes_what_opened_before_it(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    store, coordinator = TrackedStore(), TrackedCoordinator()
    settings = settings_for(tmp_path, job_store_url=f"sqlite:///{tmp_path / 'a-file' / 'jobs.sqlite3'}")
    app = create_app(settings, store=store, coordinator=coordinator)
    with pytest.raises(StartupError, match=r"could not open the job store .*; check JOB_STORE_URL"):
        await start(app)
    assert (store.closed, coordinator.closed) == (1, 1)


async def test_every_resource_is_closed_once_on_shutdown(tmp_path: Path) -> None:
    store, coordinator = TrackedStore(), TrackedCoordinator()
    runner = await start(create_app(settings_for(tmp_path), store=store, coordinator=coordinator))
    assert coordinator.active
    await runner.cleanup()
    assert (store.opened, store.closed, coordinator.opened, coordinator.closed) == (1, 1, 1, 1)
    assert not coordinator.active


# --- the real app process ------------------------------------------------------------------------


@pytest.mark.e2e
def test_an_unopenable_job_store_stops_the_app_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    bot = BotProcess(tmp_path, env={"JOB_STORE_URL": f"sqlite:///{tmp_path / 'a-file' / 'jobs.sqlite3'}"})
    with pytest.raises(BotStartError, match="exited with code 1"):
        bot.start()
    text = log_text(bot)
    assert "start-up failed: could not open the job store" in text and "check JOB_STORE_URL" in text, text
    assert "Traceback" not in text, text


@pytest.mark.e2e
def test_an_unreachable_postgresql_stops_the_app_with_one_line_and_a_traceback_only_in_debug(tmp_path: Path) -> None:
    closed_port = free_port()  # nothing listens there
    env = {"JOB_STORE_URL": f"postgresql://agent:secret@127.0.0.1:{closed_port}/agent"}
    bot = BotProcess(tmp_path, env=env)
    with pytest.raises(BotStartError, match="exited with code 1"):
        bot.start()
    text = log_text(bot)
    assert "start-up failed: could not open the coordination database" in text and "check JOB_STORE_URL" in text
    assert "Traceback" not in text and "secret" not in text, text

    bot = BotProcess(tmp_path / "debug", env={**env, "LOG_LEVEL": "DEBUG"})
    with pytest.raises(BotStartError, match="exited with code 1"):
        bot.start()
    assert "Traceback" in log_text(bot)


@pytest.mark.e2e
def test_the_ready_line_names_the_port_used_the_endpoint_and_the_next_step(tmp_path: Path) -> None:
    port = free_port()
    bot = BotProcess(tmp_path, env={"PORT": "3978"}, port=port, args=["--port", str(port)]).start()
    try:
        text = wait_for_log(bot, "next: ")
    finally:
        bot.terminate()
    endpoint = f"http://127.0.0.1:{port}/api/messages"
    assert f"ready on port {port} (host 127.0.0.1)" in text
    assert f"messaging endpoint: {endpoint}" in text
    assert f"agentsplayground -e {endpoint} -c msteams" in text


@pytest.mark.e2e
def test_a_port_in_use_stops_the_app_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bot = BotProcess(tmp_path, port=port)
        with pytest.raises(BotStartError, match="exited with code 1"):
            bot.start()
    text = log_text(bot)
    assert f"start-up failed: could not listen on 127.0.0.1:{port}" in text and "check HOST and PORT" in text, text
    assert "Traceback" not in text and "ready on port" not in text, text
