"""MCP servers: their tools offered to the agent through autogen-ext's MCP adapters.

``MCP_CONFIG`` (default ``mcp.json``) uses the common shape::

    {"servers": {
        "time": {"command": "mcp-server-time", "args": [], "env": {}},
        "everything": {"command": "node", "args": ["node_modules/.../dist/index.js", "stdio"],
                       "long_running_tools": {"trigger-long-running-operation": {"timeout": 600}}},
        "remote": {"url": "http://127.0.0.1:3001/mcp", "headers": {"Authorization": "Bearer ..."}}
    }}

Each server's session is held open by its own task for the life of the bot (the MCP client's
anyio scopes must be entered and left by one task); a server that fails to start is logged
and skipped; one that dies is restarted on its next use. Tools listed in
``long_running_tools`` are not offered as plain tools: they become long-running job tools
(a durable job per call), with the server's progress notifications mapped to job progress.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
from autogen_core import CancellationToken
from autogen_core.tools import BaseTool
from autogen_ext.tools.mcp import StdioServerParams, StreamableHttpServerParams, create_mcp_server_session
from autogen_ext.tools.mcp._base import McpToolAdapter
from mcp import ClientSession, McpError
from mcp import Tool as McpTool
from mcp.client.stdio import get_default_environment
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel

from jobs.context import JobContext
from jobs.registry import LongRunningTool, PermanentJobError, RetryPolicy

log = logging.getLogger(__name__)

ServerParams = StdioServerParams | StreamableHttpServerParams


class McpConfigError(ValueError):
    """The MCP config file cannot be used; the message says where and why."""


class McpServerStoppedError(ConnectionError):
    def __init__(self, server: str, tool: str) -> None:
        super().__init__(f"the MCP server {server!r} stopped during the call to {tool!r}; "
                         "it will be restarted on the next call")


@dataclass(frozen=True)
class LongRunningSpec:
    timeout: float = 600.0
    max_attempts: int = 1  # an MCP call has no idempotency key: retry only when the config says so


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    params: ServerParams
    long_running: Mapping[str, LongRunningSpec] = field(default_factory=dict)


def load_mcp_config(path: Path) -> list[McpServerConfig]:
    """Read the config file; a missing file means no MCP servers."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise McpConfigError(f"{path}: not valid JSON ({exc})") from None
    servers = data.get("servers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise McpConfigError(f"{path}: expected {{\"servers\": {{name: {{...}}}}}}")
    return [_server(path, name, spec) for name, spec in servers.items()]


def _server(path: Path, name: str, spec: Any) -> McpServerConfig:
    where = f"{path}: server {name!r}"
    if not isinstance(spec, dict):
        raise McpConfigError(f"{where}: expected an object")
    timeout = float(spec.get("timeout", 30))
    params: ServerParams
    if "command" in spec:
        env = {**get_default_environment(), **{str(k): str(v) for k, v in (spec.get("env") or {}).items()}}
        params = StdioServerParams(
            command=str(spec["command"]),
            args=[str(a) for a in spec.get("args", [])],
            env=env,
            cwd=str(spec.get("cwd") or path.parent.resolve()),
            read_timeout_seconds=timeout,
        )
    elif "url" in spec:
        params = StreamableHttpServerParams(url=str(spec["url"]), headers=spec.get("headers"), timeout=timeout)
    else:
        raise McpConfigError(f"{where}: needs \"command\" (stdio) or \"url\" (streamable HTTP)")
    raw = spec.get("long_running_tools") or {}
    if isinstance(raw, list):
        raw = {tool: {} for tool in raw}
    if not isinstance(raw, dict):
        raise McpConfigError(f"{where}: long_running_tools must be a list of names or an object")
    long_running = {str(tool): LongRunningSpec(float(opts.get("timeout", 600)), int(opts.get("max_attempts", 1)))
                    for tool, opts in raw.items()}
    return McpServerConfig(name, params, long_running)


class McpServerConnection:
    """One server's session, held open by a dedicated task and restarted when it died."""

    def __init__(self, config: McpServerConfig, start_timeout: float = 30.0) -> None:
        self.config = config
        self.tools: list[McpTool] = []
        self._start_timeout = start_timeout
        self._session: ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and self._session is not None

    async def start(self) -> None:
        ready: asyncio.Future[tuple[ClientSession, list[McpTool]]] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._hold(ready), name=f"mcp:{self.name}")
        try:
            self._session, self.tools = await asyncio.wait_for(asyncio.shield(ready), self._start_timeout)
        except BaseException:
            await self.stop()
            raise

    async def _hold(self, ready: asyncio.Future[tuple[ClientSession, list[McpTool]]]) -> None:
        try:
            async with create_mcp_server_session(self.config.params) as session:
                await session.initialize()
                tools = (await session.list_tools()).tools
                ready.set_result((session, list(tools)))
                await self._stop.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # an ExceptionGroup from anyio included
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            else:
                log.warning("MCP server %r stopped unexpectedly (%s); it restarts on next use", self.name, exc)
        finally:
            self._session = None

    async def session(self) -> ClientSession:
        """The live session, restarting the server first if it died."""
        async with self._lock:
            if not self.alive:
                log.info("starting MCP server %r again", self.name)
                await self.start()
            assert self._session is not None
            return self._session

    async def call_tool(self, name: str, arguments: dict[str, Any], **options: Any) -> CallToolResult:
        """Call a tool; a server found dead before the call is restarted and the call made once more."""
        session = await self.session()
        try:
            return await session.call_tool(name, arguments, **options)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # The request was never sent: safe to restart the server and send it once more.
            await self.stop()
            session = await self.session()
            return await session.call_tool(name, arguments, **options)
        except McpError as exc:
            if "connection closed" not in str(exc).lower():
                raise
            await self.stop()  # the next use starts it again
            raise McpServerStoppedError(self.name, name) from exc

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5)
            except (TimeoutError, Exception):  # stopping must not fail shutdown
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        self._session = None


class HubToolAdapter(McpToolAdapter[Any]):
    """autogen-ext's MCP adapter, resolving the live session at call time (restart-safe)."""

    def __init__(self, connection: McpServerConnection, tool: McpTool) -> None:
        super().__init__(connection.config.params, tool)
        self._connection = connection

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> Any:
        call = asyncio.ensure_future(self._connection.call_tool(self._tool.name, args.model_dump(exclude_unset=True)))
        cancellation_token.link_future(call)
        result = await call
        content = self._normalize_payload_to_content_list(result.content)
        if result.isError:
            raise RuntimeError(self.return_value_as_string(content))
        return content

    def return_value_as_string(self, value: list[Any]) -> str:
        """A text-only result as its text, so clipping cuts the text, not a JSON structure (the
        model then reads the start of the output); other content as autogen-ext serialises it."""
        if value and all(isinstance(item, TextContent) for item in value):
            return "\n".join(item.text for item in value)
        return super().return_value_as_string(value)


def _text(content: Any) -> str:
    parts = [getattr(block, "text", None) for block in content or []]
    return "\n".join(p for p in parts if p) or "(no text output)"


def long_running_mcp_tool(connection: McpServerConnection, tool: McpTool, spec: LongRunningSpec) -> LongRunningTool:
    """An MCP tool as a durable job: one job per call, progress notifications -> job progress."""
    args_model = HubToolAdapter(connection, tool).args_type()

    async def run(ctx: JobContext, args: BaseModel) -> dict[str, Any]:
        async def on_progress(progress: float, total: float | None, message: str | None = None) -> None:
            await ctx.report_progress(progress / total if total else None, message or f"step {progress:g}")

        result = await connection.call_tool(tool.name, args.model_dump(exclude_unset=True),
                                            read_timeout_seconds=timedelta(seconds=spec.timeout),
                                            progress_callback=on_progress)
        text = _text(result.content)
        if result.isError:
            raise PermanentJobError(f"{tool.name} reported an error: {text}")
        return {"message": text, "tool": tool.name, "server": connection.name}

    return LongRunningTool(
        name=tool.name,
        description=(tool.description or tool.name) + " (long-running: runs as a background job; you get the job "
                    "id at once and the result later)",
        args_model=args_model,
        run=run,
        timeout=spec.timeout,
        retry=RetryPolicy(max_attempts=spec.max_attempts),
    )


class McpHub:
    """Starts every configured server, offers their tools, stops them on shutdown."""

    def __init__(self, configs: list[McpServerConfig]) -> None:
        self._connections = [McpServerConnection(c) for c in configs]
        self._started: list[McpServerConnection] = []

    async def start(self) -> None:
        seen: set[str] = set()
        for connection in self._connections:
            try:
                await connection.start()
            except Exception as exc:  # one bad server must not stop the bot
                log.warning("MCP server %r failed to start and is skipped: %s", connection.name, exc)
                continue
            # Tool names must be unique for the model: the first server to offer a name keeps it.
            clashes = [t.name for t in connection.tools if t.name in seen]
            if clashes:
                log.warning("MCP server %r: tools %s are already offered by another server; skipped",
                            connection.name, ", ".join(clashes))
                connection.tools = [t for t in connection.tools if t.name not in seen]
            seen.update(t.name for t in connection.tools)
            self._started.append(connection)
            log.info("MCP server %r started with %d tool(s): %s", connection.name, len(connection.tools),
                     ", ".join(t.name for t in connection.tools))

    def agent_tools(self) -> list[BaseTool[Any, Any]]:
        """Plain (quick) tools, for one turn."""
        return [HubToolAdapter(c, t) for c in self._started for t in c.tools if t.name not in c.config.long_running]

    def long_running_tools(self) -> list[LongRunningTool]:
        return [long_running_mcp_tool(c, t, c.config.long_running[t.name])
                for c in self._started for t in c.tools if t.name in c.config.long_running]

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self._started), return_exceptions=True)
