"""The tool policy: who may use which tool, checked when tools are offered and again when called."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
from autogen_core import CancellationToken, FunctionCall
from autogen_core.models import CreateResult, FunctionExecutionResultMessage, LLMMessage
from autogen_core.tools import Tool, ToolSchema
from pydantic import BaseModel

from agent.events import JOB_RESULT_SOURCE
from agent.offline_model import OfflineChatCompletionClient
from agent.runner import AgentTurnRunner
from agent.tool_policy import PolicedTool, ToolPolicy, ToolPolicyError, ToolRule, load_rules
from agent.tools import TurnScope, turn_tools
from agent.turns import AgentInput
from jobs.activate_line import make_activate_line_tool
from jobs.registry import JobRegistry
from jobs.runner import JobRunner
from runtime.protocol import Requester
from storage.memory import MemoryStore

KEY = "msteams:c1"
ADA = Requester(id="29:ada", name="Ada", aad_object_id="AAD-ADA", tenant_id="tenant-1", conversation_type="personal")
BOB = Requester(id="29:bob", name="Bob", aad_object_id="aad-bob", tenant_id="tenant-2", conversation_type="personal")


def test_enabled_and_disabled_take_names_and_globs() -> None:
    policy = ToolPolicy(enabled=("activate_*", "list_jobs"), disabled=("activate_old_*",))
    assert policy.refusal("activate_new_line", ADA) is None
    assert policy.refusal("list_jobs", ADA) is None
    assert policy.refusal("activate_old_line", ADA) == "disabled"
    assert policy.refusal("echo", ADA) == "disabled"  # no enabled pattern matches
    assert ToolPolicy().refusal("anything", None) is None  # the default: every tool, for everyone


def test_rules_restrict_tools_to_tenants_and_users() -> None:
    policy = ToolPolicy(rules=(ToolRule("activate_new_line", users=frozenset({"aad-ada"})),
                               ToolRule("mcp_*", tenants=frozenset({"tenant-1"})),
                               ToolRule("both", tenants=frozenset({"tenant-1"}), users=frozenset({"aad-bob"}))))
    assert policy.refusal("activate_new_line", ADA) is None  # object ids compare case-insensitively
    assert policy.refusal("activate_new_line", BOB) == "not_allowed"
    assert policy.refusal("mcp_fetch", ADA) is None and policy.refusal("mcp_fetch", BOB) == "not_allowed"
    assert policy.refusal("both", ADA) == "not_allowed" and policy.refusal("both", BOB) == "not_allowed"
    assert policy.refusal("echo", BOB) is None  # no rule: open
    # Nobody (a job-result turn) is in no list, and an unknown requester has no ids.
    assert policy.refusal("activate_new_line", None) == "not_allowed"
    assert policy.refusal("activate_new_line", Requester()) == "not_allowed"
    assert policy.refusal("echo", None) is None


def test_the_policy_file_is_read_and_a_bad_one_is_a_clear_error(tmp_path: Path) -> None:
    good = tmp_path / "policy.json"
    good.write_text(json.dumps({"tools": {"activate_new_line": {"users": ["AAD-ADA"]},
                                          "mcp_*": {"tenants": ["tenant-1"], "users": []}}}))
    assert load_rules(good) == (ToolRule("activate_new_line", users=frozenset({"aad-ada"})),
                                ToolRule("mcp_*", tenants=frozenset({"tenant-1"}), users=frozenset()))
    cases = {
        "missing.json": None,
        "not-json.json": "{nope",
        "list.json": "[]",
        "extra.json": json.dumps({"tools": {}, "other": 1}),
        "empty-rule.json": json.dumps({"tools": {"x": {}}}),
        "unknown-key.json": json.dumps({"tools": {"x": {"groups": ["a"]}}}),
        "not-a-list.json": json.dumps({"tools": {"x": {"users": "aad-ada"}}}),
        "blank-id.json": json.dumps({"tools": {"x": {"users": [" "]}}}),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ToolPolicyError, match="TOOL_POLICY_FILE"):
            ToolPolicy.from_settings(("*",), (), str(path))


def tools_for(policy: ToolPolicy, scope: TurnScope, store: MemoryStore) -> list[Any]:
    registry = JobRegistry([make_activate_line_tool(1)])
    return policy.tools_for(scope.requester, turn_tools(scope, registry, store, JobRunner(store, registry,
                                                                                           lambda key: None)))


def test_tools_a_requester_may_not_use_are_not_offered() -> None:
    policy = ToolPolicy(disabled=("cancel_job",), rules=(ToolRule("activate_new_line", users=frozenset({"aad-ada"})),))
    store = MemoryStore()
    assert [t.name for t in tools_for(policy, TurnScope(KEY, ADA), store)] == [
        "activate_new_line", "get_job_status", "list_jobs"]
    assert [t.name for t in tools_for(policy, TurnScope(KEY, BOB), store)] == ["get_job_status", "list_jobs"]


async def test_a_forged_call_is_refused_when_called_and_records_no_job() -> None:
    """The check at call time does not rely on the listing: a tool wrapped for a requester the
    policy refuses (as a forged or stale call would reach it) starts nothing."""
    policy = ToolPolicy(rules=(ToolRule("activate_new_line", users=frozenset({"aad-ada"})),))
    scope = TurnScope(KEY, BOB)
    registry = JobRegistry([make_activate_line_tool(1)])
    [schedule] = [t for t in turn_tools(scope, registry, MemoryStore(), JobRunner(MemoryStore(), registry,
                                                                                   lambda key: None))
                  if t.name == "activate_new_line"]
    tool = PolicedTool(schedule, policy, BOB)
    result = await tool.run_json({"phone_number": "555-0100"}, CancellationToken(), call_id="call_1")
    assert json.loads(result)["error"] == "not_allowed"
    assert "You are not allowed to use `activate_new_line`" in json.loads(result)["message"]
    assert scope.new_jobs == []
    # The same wrapper lets the allowed person through.
    allowed = PolicedTool(schedule, policy, ADA)
    assert json.loads(await allowed.run_json({"phone_number": "555-0100"}, CancellationToken()))["status"] == "queued"
    assert [j.tool for j in scope.new_jobs] == ["activate_new_line"]


class ForgingModel(OfflineChatCompletionClient):
    """A model that calls ``activate_new_line`` whatever tools it was offered."""

    async def create(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = [],
                     tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
                     json_output: bool | type[BaseModel] | None = None, extra_create_args: Mapping[str, Any] = {},
                     cancellation_token: CancellationToken | None = None) -> CreateResult:
        last = messages[-1]
        if isinstance(last, FunctionExecutionResultMessage):
            return CreateResult(finish_reason="stop", content=" | ".join(r.content for r in last.content),
                                usage=self.actual_usage(), cached=False)
        call = FunctionCall(id=f"call_{uuid.uuid4().hex[:8]}", name="activate_new_line",
                            arguments=json.dumps({"phone_number": "555-0100"}))
        return CreateResult(finish_reason="function_calls", content=[call], usage=self.actual_usage(), cached=False)


@pytest.mark.parametrize("case", ["disabled", "restricted", "job_result"])
async def test_a_model_naming_a_tool_it_may_not_use_starts_nothing(case: str) -> None:
    store = MemoryStore()
    policy = {"disabled": ToolPolicy(disabled=("activate_new_line",)),
              "restricted": ToolPolicy(rules=(ToolRule("activate_new_line", users=frozenset({"aad-ada"})),)),
              "job_result": ToolPolicy()}[case]
    runner = AgentTurnRunner(ForgingModel(), lambda scope: tools_for(policy, scope, store))
    item = (AgentInput("Background job finished.\n{}", source=JOB_RESULT_SOURCE) if case == "job_result"
            else AgentInput("hello", requester=BOB))
    outcome = await runner.run(KEY, None, [item])
    assert outcome.new_jobs == []
    [reply] = outcome.replies
    expected = "cannot start another job" if case == "job_result" else "activate_new_line"
    assert expected in reply, reply
