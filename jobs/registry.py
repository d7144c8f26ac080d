"""Tools are declared once, with ``@tool`` on an async function, and then offered to the agent.

A tool module (named in the ``TOOL_MODULES`` setting, imported once at start-up) declares its tools
the way Temporal's ``@activity.defn`` does::

    @tool(example="weather in Paris", offline_phrase=re.compile(r"^weather in (?P<city>.+)$", re.I))
    async def get_weather(city: str) -> str:
        \"\"\"Today's weather in a city.\"\"\"                     # the model reads this
        ...

    @tool(long_running=True, timeout=600, retry=RetryPolicy(max_attempts=3))
    async def weather_report(ctx: JobContext, city: str, days: int = 3) -> dict[str, Any]:
        \"\"\"A long weather report.\"\"\"
        await ctx.report_progress(0.5, "Halfway")
        return {"message": "..."}                               # relayed to the user

- arguments: the function's parameters (after ``ctx`` for a long-running tool) become a pydantic
  model, or the one parameter annotated with a pydantic model is it;
- a plain tool runs in the turn and answers the model directly; a long-running tool
  (``long_running=True``) records a durable job instead and its result is announced when it finishes;
- ``offline_phrase`` (a regex whose named groups are arguments) and ``example`` teach the
  offline model the tool and show it in the help text and the welcome card;
- settings a tool needs come from the environment through :func:`tool_setting`.

Declarations live in ``jobs/`` (the layer below ``agent/``) so a tool module imports nothing above it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import random
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

from pydantic import BaseModel, create_model

from jobs.context import JobContext
from runtime.config import ConfigError, read_dotenv


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay = min(max_delay, initial * multiplier**(n-1)) ± jitter."""

    max_attempts: int = 3
    initial_delay: float = 2.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.2  # fraction of the delay, drawn uniformly in [-jitter, +jitter]

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = min(self.max_delay, self.initial_delay * self.multiplier ** max(0, attempt - 1))
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))


ToolRun = Callable[[JobContext, Any], Awaitable[dict[str, Any]]]


class PermanentJobError(Exception):
    """A failure retrying cannot fix (bad input, unknown resource): fail at once."""


class ToolDeclarationError(ConfigError):
    """A tool module is missing or declares a tool wrongly: a configuration error (the app exits 2)."""


@dataclass(frozen=True)
class LongRunningTool:
    """A tool whose call becomes a durable job (what the job runner runs).

    ``run`` receives the job context and the validated ``args_model`` instance and returns a
    JSON-able dict; a ``message`` key in it is the human sentence the agent can relay.
    Validation errors of ``args_model`` are reported to the model at call time, before any
    job is recorded.
    """

    name: str
    description: str
    args_model: type[BaseModel]
    run: ToolRun
    timeout: float = 600.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    scheduled_message: Callable[[Any, str], str] | None = None
    #: A call waits for a person's yes before it runs (``@tool(approval=True)``; jobs/approval.py).
    approval: bool = False


#: Names the bot's own tools use (agent/tools.py, agent/tool_output.py): a declared tool may not take them.
RESERVED_NAMES = frozenset({"get_job_status", "list_jobs", "cancel_job", "background_job_result"})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")  # what model APIs accept as a function name
LONG_RUNNING_NOTE = ("(long-running: it runs as a background job; the call returns the job id at once and the "
                     "result arrives later)")


@dataclass(frozen=True)
class DeclaredTool:
    """What ``@tool`` made of a function: everything needed to offer, run and explain the tool."""

    name: str
    description: str
    args_model: type[BaseModel]
    fn: Callable[..., Awaitable[Any]]
    long_running: bool
    timeout: float
    retry: RetryPolicy
    example: str | None = None
    offline_phrase: re.Pattern[str] | None = None
    scheduled_message: Callable[[Any, str], str] | None = None
    #: The function takes the whole args model (one parameter) rather than one parameter per field.
    takes_model: bool = False
    #: A call waits for a person's yes before it runs (long-running tools only; jobs/approval.py).
    approval: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return self.fn(*args, **kwargs)  # still callable as the plain function (tests, other code)

    @property
    def summary(self) -> str:
        """The description's first sentence (help texts)."""
        first = self.description.split("\n\n", 1)[0].replace("\n", " ")
        return first.split(". ", 1)[0].rstrip(".")

    async def invoke(self, args: BaseModel, ctx: JobContext | None = None) -> Any:
        """Call the function with validated arguments (and the job context, for a long-running tool)."""
        head = (ctx,) if self.long_running else ()
        if self.takes_model:
            return await self.fn(*head, args)
        return await self.fn(*head, **{name: getattr(args, name) for name in type(args).model_fields})

    @property
    def job(self) -> LongRunningTool:
        """This tool as the job runner runs it (long-running tools only)."""
        if not self.long_running:
            raise TypeError(f"{self.name} is not a long-running tool")

        async def run(ctx: JobContext, args: Any) -> dict[str, Any]:
            return as_result(await self.invoke(args, ctx))

        return LongRunningTool(self.name, f"{self.description} {LONG_RUNNING_NOTE}", self.args_model, run,
                               self.timeout, self.retry, self.scheduled_message, self.approval)


def as_result(value: Any) -> dict[str, Any]:
    """A tool's return value as the JSON-able dict a job stores: a string is the message to relay."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        return {"message": value}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return {"result": value}


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@overload
def tool(fn: Callable[..., Awaitable[Any]], /) -> DeclaredTool: ...
@overload
def tool(*, name: str | None = ..., long_running: bool = ..., args: type[BaseModel] | None = ...,
         timeout: float | None = ..., retry: RetryPolicy | None = ..., example: str | None = ...,
         offline_phrase: re.Pattern[str] | None = ...,
         scheduled_message: Callable[[Any, str], str] | None = ...,
         approval: bool = ...) -> Callable[[F], DeclaredTool]: ...


def tool(fn: Callable[..., Awaitable[Any]] | None = None, /, *, name: str | None = None, long_running: bool = False,
         args: type[BaseModel] | None = None, timeout: float | None = None, retry: RetryPolicy | None = None,
         example: str | None = None, offline_phrase: re.Pattern[str] | None = None,
         scheduled_message: Callable[[Any, str], str] | None = None, approval: bool = False,
         ) -> DeclaredTool | Callable[[F], DeclaredTool]:
    """Declare an async function as a tool (see the module docstring).

    ``timeout`` in seconds (default 30 for a plain tool, 600 for a long-running one); ``retry``:
    attempts and backoff (default: one attempt for a plain tool, three for a long-running one);
    ``scheduled_message(args, job_id)``: what the model is told when a long-running call is recorded;
    ``approval``: a call waits for a person's yes before it runs (long-running tools only).
    A wrong declaration raises :class:`ToolDeclarationError` when its module is imported."""

    def declare(function: Callable[..., Awaitable[Any]]) -> DeclaredTool:
        tool_name = name or function.__name__
        where = f"tool {tool_name!r} ({function.__module__}.{function.__qualname__})"
        if not inspect.iscoroutinefunction(function):
            raise ToolDeclarationError(f"{where}: must be an async function (async def)")
        if not _NAME.match(tool_name) or tool_name in RESERVED_NAMES:
            raise ToolDeclarationError(f"{where}: the name must be letters, digits, _ or - (at most 64) and not one "
                                       f"of the bot's own tools ({', '.join(sorted(RESERVED_NAMES))})")
        description = inspect.getdoc(function) or ""
        if not description.strip():
            raise ToolDeclarationError(f"{where}: needs a docstring; it is the description the model reads")
        model, takes_model = _args_model(function, tool_name, long_running, args, where)
        if offline_phrase is not None:
            unknown = set(offline_phrase.groupindex) - set(model.model_fields)
            if unknown:
                raise ToolDeclarationError(f"{where}: offline_phrase groups {sorted(unknown)} are not arguments "
                                           f"(arguments: {sorted(model.model_fields)})")
            if example is not None and not offline_phrase.search(example):
                raise ToolDeclarationError(f"{where}: offline_phrase does not match its own example {example!r}")
        if scheduled_message is not None and not long_running:
            raise ToolDeclarationError(f"{where}: scheduled_message is for long-running tools only")
        if approval and not long_running:
            raise ToolDeclarationError(f"{where}: approval=True is for long-running tools only (a call waits as a "
                                       "durable job until a person decides); add long_running=True")
        seconds = timeout if timeout is not None else (600.0 if long_running else 30.0)
        if seconds <= 0:
            raise ToolDeclarationError(f"{where}: timeout must be positive seconds, got {seconds!r}")
        policy = retry or (RetryPolicy() if long_running else RetryPolicy(max_attempts=1))
        if policy.max_attempts < 1:
            raise ToolDeclarationError(f"{where}: retry.max_attempts must be at least 1")
        return DeclaredTool(tool_name, description, model, function, long_running, float(seconds), policy,
                            example, offline_phrase, scheduled_message, takes_model, approval)

    return declare(fn) if fn is not None else declare


def _args_model(function: Callable[..., Any], tool_name: str, long_running: bool, given: type[BaseModel] | None,
                where: str) -> tuple[type[BaseModel], bool]:
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception as exc:  # an annotation that does not resolve
        raise ToolDeclarationError(f"{where}: its annotations do not resolve ({exc})") from None
    params = list(inspect.signature(function).parameters.values())
    takes_context = bool(params) and hints.get(params[0].name) is JobContext
    if long_running and not takes_context:
        raise ToolDeclarationError(f"{where}: a long-running tool's first parameter is the job context "
                                   "(ctx: JobContext)")
    if not long_running and takes_context:
        raise ToolDeclarationError(f"{where}: takes a JobContext, which only long-running tools get "
                                   "(add long_running=True)")
    params = params[1:] if takes_context else params
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise ToolDeclarationError(f"{where}: parameter {param.name!r}: use named parameters (no *args, **kw, /)")
        if param.name not in hints:
            raise ToolDeclarationError(f"{where}: parameter {param.name!r} needs a type annotation")
    single = hints.get(params[0].name) if len(params) == 1 else None
    if isinstance(single, type) and issubclass(single, BaseModel):
        if given is not None and given is not single:
            raise ToolDeclarationError(f"{where}: args={given.__name__} but the parameter is a {single.__name__}")
        return single, True
    if given is not None:
        raise ToolDeclarationError(f"{where}: with args={given.__name__} the function takes one parameter of "
                                   "that type")
    fields: dict[str, Any] = {
        p.name: (hints[p.name], ... if p.default is p.empty else p.default) for p in params}
    title = "".join(part.capitalize() for part in re.split(r"[_-]", tool_name)) + "Args"
    try:
        return create_model(title, **fields), False
    except Exception as exc:  # a type pydantic cannot validate
        raise ToolDeclarationError(f"{where}: its parameters cannot be validated ({exc})") from None


T = TypeVar("T", str, int, float, bool)
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@functools.cache
def _dotenv() -> dict[str, str]:
    return read_dotenv(Path(".env"))  # once: the same file Settings reads


def tool_setting(name: str, default: T) -> T:
    """A setting a tool module reads from the environment (or ``.env``, as the app's settings are),
    typed like ``default`` (str, int, float or bool); blank or unset: ``default``. Read it where it is
    used (each call reads it again), and once at import so a bad value stops the start-up there."""
    raw = os.environ.get(name, _dotenv().get(name, "")).strip()
    if not raw:
        return default
    kind = type(default)
    try:
        if kind is bool:
            if raw.lower() not in _TRUE | _FALSE:
                raise ValueError(raw)
            return raw.lower() in _TRUE
        return kind(raw)
    except ValueError:
        raise ToolDeclarationError(f"{name} must be {'a number' if kind in (int, float) else 'true or false'}"
                                   f"{' (whole)' if kind is int else ''}, got {raw!r}") from None


def load_tool_modules(names: Sequence[str]) -> list[DeclaredTool]:
    """Import each tool module once and collect the tools it declares (module order, then file order).

    Raises :class:`ToolDeclarationError`, naming the setting and the module, if a module cannot be
    imported, declares a tool wrongly or declares none, or two tools share a name."""
    tools: dict[str, DeclaredTool] = {}
    for module_name in names:
        where = f"TOOL_MODULES: {module_name}"
        try:
            module = importlib.import_module(module_name)
        except ToolDeclarationError as exc:
            raise ToolDeclarationError(f"{where}: {exc}") from None
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                raise ToolDeclarationError(f"{where}: no such module (a dotted module name importable from the "
                                           "app's directory, e.g. examples.weather)") from None
            raise ToolDeclarationError(f"{where}: failed to import: {exc}") from None
        except Exception as exc:
            raise ToolDeclarationError(f"{where}: failed to import: {type(exc).__name__}: {exc}") from None
        declared = _declared_in(module)
        if not declared:
            raise ToolDeclarationError(f"{where}: declares no tools (decorate an async function with @tool, "
                                       "from jobs.registry)")
        for declared_tool in declared:
            if declared_tool.name in tools:
                raise ToolDeclarationError(f"{where}: a tool named {declared_tool.name!r} is already declared "
                                           f"(in {tools[declared_tool.name].fn.__module__})")
            tools[declared_tool.name] = declared_tool
    return list(tools.values())


def _declared_in(module: types.ModuleType) -> list[DeclaredTool]:
    # Only the module's own: a tool imported from another module is declared there.
    return [value for value in vars(module).values()
            if isinstance(value, DeclaredTool) and value.fn.__module__ == module.__name__]


class JobRegistry:
    """The long-running tools the job runner can run, by name (declared ones and MCP servers')."""

    def __init__(self, tools: Sequence[LongRunningTool | DeclaredTool] | None = None) -> None:
        self._tools: dict[str, LongRunningTool] = {}
        for tool_ in tools or []:
            self.register(tool_)

    def register(self, tool: LongRunningTool | DeclaredTool) -> None:
        job = tool.job if isinstance(tool, DeclaredTool) else tool
        if job.name in self._tools:
            raise ValueError(f"a long-running tool named {job.name!r} is already registered")
        self._tools[job.name] = job

    def get(self, name: str) -> LongRunningTool:
        try:
            return self._tools[name]
        except KeyError:
            raise LookupError(f"no long-running tool named {name!r}") from None

    def __iter__(self) -> Iterator[LongRunningTool]:
        return iter(self._tools.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tools


__all__ = ["DeclaredTool", "JobRegistry", "LongRunningTool", "PermanentJobError", "RetryPolicy",
           "ToolDeclarationError", "load_tool_modules", "tool", "tool_setting"]
