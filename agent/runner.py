"""One agent turn: rebuild the team, hydrate it from stored state, run it, save pruned state.

The team (``RoundRobinGroupChat`` with one ``AssistantAgent``) is rebuilt for every turn so
no live object outlives a commit: everything that matters is in the returned state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import TextMessage, ToolCallSummaryMessage
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core.models import ChatCompletionClient
from autogen_core.tools import BaseTool

from agent.context import BoundedChatCompletionContext
from agent.tools import TurnScope
from storage.abc import JSON, JobRecord

log = logging.getLogger(__name__)

AGENT_NAME = "assistant"
MANAGER_KEY = "RoundRobinGroupChatManager"

DEFAULT_SYSTEM_MESSAGE = (
    "You are a helpful assistant in Microsoft Teams. Some tools (such as activate_new_line) take minutes: "
    "calling one starts a background job and returns its job id at once. Tell the user the job has started "
    "and that you will message them when it finishes; do not wait or poll. When a message from the "
    "'background_job' source arrives, it carries the outcome of an earlier tool call (matched by call_id): "
    "tell the user the result in one or two sentences. Use get_job_status, list_jobs and cancel_job when the "
    "user asks about jobs. Be concise."
)


class AgentError(Exception):
    """The model or the agent failed; the turn is not committed as a success."""


@dataclass(frozen=True)
class AgentInput:
    text: str
    source: str = "user"


@dataclass
class TurnOutcome:
    state: JSON
    replies: list[str] = field(default_factory=list)
    new_jobs: list[JobRecord] = field(default_factory=list)


ToolsFactory = Callable[[TurnScope], Sequence[BaseTool[Any, Any]]]


class AgentTurnRunner:
    def __init__(
        self,
        model_client: ChatCompletionClient,
        tools_factory: ToolsFactory,
        *,
        system_message: str = DEFAULT_SYSTEM_MESSAGE,
        context_messages: int = 40,
        thread_messages: int = 20,
    ) -> None:
        self._model_client = model_client
        self._tools_factory = tools_factory
        self._system_message = system_message
        self._context_messages = context_messages
        self._thread_messages = thread_messages

    def _team(self, scope: TurnScope) -> RoundRobinGroupChat:
        agent = AssistantAgent(
            AGENT_NAME,
            model_client=self._model_client,
            tools=list(self._tools_factory(scope)),
            system_message=self._system_message,
            model_context=BoundedChatCompletionContext(buffer_size=self._context_messages),
            reflect_on_tool_use=True,
        )
        return RoundRobinGroupChat([agent], max_turns=1)

    async def run(self, conversation_key: str, state: JSON | None, inputs: Sequence[AgentInput]) -> TurnOutcome:
        """Run the inputs one after the other (each gets its own reply) and return the new state."""
        scope = TurnScope(conversation_key)
        team = self._team(scope)
        if state:
            await team.load_state(state)
        replies: list[str] = []
        try:
            for item in inputs:
                result = await team.run(task=[TextMessage(source=item.source, content=item.text)])
                replies.extend(
                    m.content
                    for m in result.messages
                    if m.source == AGENT_NAME and isinstance(m, TextMessage | ToolCallSummaryMessage) and m.content
                )
            new_state = prune_state(dict(await team.save_state()), self._thread_messages)
        except Exception as exc:
            raise AgentError(f"{type(exc).__name__}: {exc}") from exc
        return TurnOutcome(state=new_state, replies=replies, new_jobs=scope.new_jobs)


def prune_state(state: dict[str, Any], thread_messages: int) -> dict[str, Any]:
    """Bound the group-chat manager's message_thread, which AutoGen never trims."""
    manager = state.get("agent_states", {}).get(MANAGER_KEY)
    if isinstance(manager, dict) and isinstance(manager.get("message_thread"), list):
        manager["message_thread"] = manager["message_thread"][-thread_messages:]
    return state
