"""The tool policy: which tools the agent may use, and for whom.

Three settings, read once at start-up:

- ``ENABLED_TOOLS``: comma-separated tool names or globs (``fnmatch``: ``*``, ``?``, ``[...]``);
  default ``*`` (every tool). A tool no pattern matches is off for everyone.
- ``DISABLED_TOOLS``: names or globs switched off for everyone, whatever ENABLED_TOOLS says.
- ``TOOL_POLICY_FILE``: a JSON file restricting tools to some tenants and/or users::

      {"tools": {
          "activate_new_line": {"tenants": ["<tenant id>"], "users": ["<AAD object id>", ...]},
          "mcp_*": {"users": ["<AAD object id>"]}
      }}

  A key is a tool name or a glob; every rule whose key matches applies. ``tenants`` lets only
  requesters of those tenants use the tool, ``users`` only those Entra ID (AAD) object ids; with
  both, a requester must be in both. Tools no rule matches are open to every requester. A file
  that cannot be read or has another shape stops the bot at start-up (:class:`ToolPolicyError`).

The policy is applied twice in every turn, by :meth:`ToolPolicy.tools_for`: a tool the
requester may not use is not offered to the model, and every offered tool is wrapped in a
:class:`PolicedTool` that checks again when it is called, before the tool runs, so no call
starts anything the policy forbids, whatever the model says. A refused call answers the model
with ``{"error": "not_allowed", "message": "You are not allowed to use ..."}`` to relay.

A job-result turn has no requester (``None``, "nobody"): it may use only tools no tenant or
user rule restricts (and it starts no job at all, see ``agent.tools.ScheduleJobTool``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autogen_core import CancellationToken
from autogen_core.tools import BaseTool, ToolSchema
from pydantic import BaseModel

from runtime import metrics
from runtime.protocol import Requester

log = logging.getLogger(__name__)


class ToolPolicyError(ValueError):
    """The tool policy cannot be used; the message names the setting or file and says why."""


@dataclass(frozen=True)
class ToolRule:
    """Who may use the tools a pattern matches: None = no restriction of that kind."""

    pattern: str
    tenants: frozenset[str] | None = None
    users: frozenset[str] | None = None

    def allows(self, requester: Requester | None) -> bool:
        if requester is None:
            return False  # nobody is in any list
        if self.tenants is not None and requester.tenant_id.lower() not in self.tenants:
            return False
        return self.users is None or requester.aad_object_id.lower() in self.users


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def refusal_result(tool: str, reason: str) -> str:
    """The tool result of a refused call: what the model tells the user."""
    why = "it is switched off on this bot" if reason == "disabled" else "it is restricted to other people"
    return json.dumps({"error": "not_allowed", "reason": reason,
                       "message": f"You are not allowed to use `{tool}` here: {why}. Nothing was started."})


@dataclass(frozen=True)
class ToolPolicy:
    enabled: tuple[str, ...] = ("*",)
    disabled: tuple[str, ...] = ()
    rules: tuple[ToolRule, ...] = field(default_factory=tuple)

    def refusal(self, tool: str, requester: Requester | None) -> str | None:
        """None if ``requester`` may use ``tool``; else the reason (``disabled`` or ``not_allowed``)."""
        if not _matches(tool, self.enabled) or _matches(tool, self.disabled):
            return "disabled"
        if any(not rule.allows(requester) for rule in self.rules if fnmatch.fnmatchcase(tool, rule.pattern)):
            return "not_allowed"
        return None

    def tools_for(self, requester: Requester | None, tools: Iterable[BaseTool[Any, Any]]) -> list[BaseTool[Any, Any]]:
        """The tools to offer in a turn of ``requester``, each checking the policy again when called."""
        return [PolicedTool(tool, self, requester) for tool in tools if self.refusal(tool.name, requester) is None]

    def describe(self) -> str:
        """One line for the start-up log."""
        rules = "; ".join(f"{r.pattern}: " + ", ".join(
            f"{len(ids)} {kind}" for kind, ids in (("tenant(s)", r.tenants), ("user(s)", r.users)) if ids is not None)
            for r in self.rules)
        return (f"enabled {', '.join(self.enabled)}; disabled {', '.join(self.disabled) or 'none'}; "
                f"restricted {rules or 'none'}")

    @classmethod
    def from_settings(cls, enabled: Sequence[str], disabled: Sequence[str], policy_file: str) -> ToolPolicy:
        return cls(tuple(enabled) or ("*",), tuple(disabled), load_rules(Path(policy_file)) if policy_file else ())


def load_rules(path: Path) -> tuple[ToolRule, ...]:
    """Parse TOOL_POLICY_FILE (read once, at start-up, before the event loop runs)."""
    where = f"TOOL_POLICY_FILE {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ToolPolicyError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ToolPolicyError(f"{where}: not valid JSON ({exc})") from None
    tools = data.get("tools") if isinstance(data, dict) else None
    if not isinstance(tools, dict) or set(data) != {"tools"}:
        raise ToolPolicyError(f'{where}: expected {{"tools": {{"<tool name or glob>": {{"tenants": [...], '
                              f'"users": [...]}}}}}}')
    return tuple(_rule(where, pattern, spec) for pattern, spec in tools.items())


def _rule(where: str, pattern: str, spec: Any) -> ToolRule:
    if not isinstance(spec, dict) or not spec or not set(spec) <= {"tenants", "users"}:
        raise ToolPolicyError(f"{where}: tool {pattern!r} needs an object with \"tenants\" and/or \"users\" "
                              "(lists of tenant ids / AAD object ids)")
    return ToolRule(pattern, _ids(where, pattern, spec, "tenants"), _ids(where, pattern, spec, "users"))


def _ids(where: str, pattern: str, spec: Mapping[str, Any], name: str) -> frozenset[str] | None:
    if name not in spec:
        return None
    values = spec[name]
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise ToolPolicyError(f"{where}: tool {pattern!r}: {name!r} must be a list of non-empty strings")
    return frozenset(v.strip().lower() for v in values)


class PolicedTool(BaseTool[BaseModel, Any]):
    """A tool as offered in one turn: the policy is checked for the turn's requester at every call."""

    def __init__(self, inner: BaseTool[Any, Any], policy: ToolPolicy, requester: Requester | None) -> None:
        super().__init__(inner.args_type(), inner.return_type(), inner.name, inner.description)
        self._inner = inner
        self._policy = policy
        self._requester = requester

    @property
    def schema(self) -> ToolSchema:
        return self._inner.schema

    def _refused(self) -> str | None:
        if (reason := self._policy.refusal(self.name, self._requester)) is None:
            return None
        metrics.TOOL_CALLS_REFUSED.labels(reason).inc()
        who = self._requester.aad_object_id or self._requester.id if self._requester else "nobody"
        log.warning("refused a call of tool %r by %s: %s", self.name, who or "an unknown requester", reason)
        return refusal_result(self.name, reason)

    async def run_json(self, args: Mapping[str, Any], cancellation_token: CancellationToken,
                       call_id: str | None = None) -> Any:
        if (refused := self._refused()) is not None:
            return refused
        return await self._inner.run_json(args, cancellation_token, call_id=call_id)

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> Any:
        if (refused := self._refused()) is not None:
            return refused
        return await self._inner.run(args, cancellation_token)

    def return_value_as_string(self, value: Any) -> str:
        return value if isinstance(value, str) else self._inner.return_value_as_string(value)
