"""A model context whose *stored* history is bounded, not only the view sent to the model.

AutoGen's ``BufferedChatCompletionContext`` keeps every message and only trims what it
returns, so its saved state grows forever. This one drops old messages as new ones arrive.
"""

from __future__ import annotations

from collections.abc import Callable

from autogen_core.model_context import BufferedChatCompletionContext
from autogen_core.models import FunctionExecutionResultMessage, LLMMessage


class BoundedChatCompletionContext(BufferedChatCompletionContext):
    async def add_message(self, message: LLMMessage) -> None:
        await super().add_message(message)
        self._messages = trim_messages(self._messages, self._buffer_size)

    def remove(self, unwanted: Callable[[LLMMessage], bool]) -> None:
        """Forget the messages ``unwanted`` picks (a prompt of ours that carries nothing worth a slot)."""
        self._messages = trim_messages([m for m in self._messages if not unwanted(m)], self._buffer_size)


def trim_messages(messages: list[LLMMessage], limit: int) -> list[LLMMessage]:
    """Keep the last ``limit`` messages, never starting with an orphaned tool result."""
    kept = messages[-limit:]
    while kept and isinstance(kept[0], FunctionExecutionResultMessage):
        kept = kept[1:]
    return kept
