"""Fixed conversational flows that never go to the model: help, jobs, cancel, reset (asks first).

They run inline, inside the HTTP request, on botbuilder-dialogs; dialog state lives in
``ConversationState`` over the durable store, so a pending "are you sure?" survives restarts.
While it is pending, a yes or a no answers it and any other message ends it and is handled as
if no question had been asked.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from botbuilder.core import CardFactory, ConversationState, MessageFactory, TurnContext
from botbuilder.dialogs import (
    ComponentDialog,
    Dialog,
    DialogSet,
    DialogTurnResult,
    WaterfallDialog,
    WaterfallStepContext,
)
from botbuilder.dialogs.prompts import ConfirmPrompt
from botbuilder.schema import Activity

from dialogs.buttons import RESET_NO, RESET_YES, reset_question_card
from jobs.access import CancelRefusedError
from jobs.runner import CancelResult
from runtime.protocol import JSON, Requester, conversation_key
from storage.abc import JobNotFoundError, JobRecord

log = logging.getLogger(__name__)

COMMANDS = {
    "help": "show what I can do",
    "jobs": "list this conversation's background jobs",
    "cancel": "cancel a background job: cancel JOB_ID",
    "reset": "forget this conversation (asks first)",
}

OnReset = Callable[[TurnContext], Awaitable[None]]
#: (conversation key, job id, who asks): raises JobNotFoundError, or CancelRefusedError if they may not.
CancelJob = Callable[[str, str, Requester], Awaitable[CancelResult]]
ListJobs = Callable[[str], Awaitable[list[JobRecord]]]
#: (the jobs, who looks): the jobs list as an Adaptive Card. The edge renders (bot.cards.jobs_list_card);
#: the dialogs only decide when, so they import nothing of bot/ (which imports them).
JobsCard = Callable[[list[JobRecord], Requester], JSON]
#: turn_state flag: this turn confirmed a reset, so the dialog state is deleted, not saved.
RESET_CONFIRMED = "reset_confirmed"
_CANCEL = re.compile(r"^cancel\s+(?:job\s+)?`?(?P<id>[0-9a-f]{12})`?$")


async def cancel_reply(cancel_job: CancelJob, key: str, job_id: str, requester: Requester) -> Activity:
    """Cancel a job and say what happened, in words a person expects."""
    try:
        outcome = await cancel_job(key, job_id, requester)
    except JobNotFoundError:
        return MessageFactory.text(f"There is no job `{job_id}` in this conversation. Say `jobs` to see them.")
    except CancelRefusedError as refused:
        return MessageFactory.text(str(refused))
    return MessageFactory.text(outcome.message())


def _key(turn_context: TurnContext) -> str:
    activity = turn_context.activity
    return conversation_key(activity.channel_id, activity.conversation.id)


def normalise_command(text: str) -> str:
    return " ".join(text.strip().lower().lstrip("/").split())


#: What answers the reset question (typed, or said by the card's Yes / No buttons).
YES_ANSWERS = frozenset({RESET_YES, "y", "yeah", "yep", "sure", "ok", "okay", "yes please", "yes, reset"})
NO_ANSWERS = frozenset({RESET_NO, "n", "nope", "nah", "no thanks", "keep", "keep it"})
#: turn_state: the answer (True/False) CommandDialogs.handle read for the pending question.
RESET_ANSWER = "reset_answer"


def reset_answer(text: str) -> bool | None:
    """True for yes, False for no, None when the message is about something else."""
    answer = normalise_command(text).rstrip(".!")
    if answer in YES_ANSWERS:
        return True
    if answer in NO_ANSWERS:
        return False
    return None


RESET_QUESTION = ("This makes me forget everything in this conversation (background jobs keep running). "
                  "Reset? Answer **yes** or **no**.")


def reset_question(channel_id: str | None) -> Activity:
    """The question with Yes / No buttons. In Teams (and the Playground) one card says it all,
    as one message; other channels (the Emulator) get the question as text, the buttons below."""
    if channel_id == "msteams":
        return Activity(type="message", summary="Reset? Answer yes or no.",
                        attachments=[CardFactory.adaptive_card(reset_question_card(RESET_QUESTION))])
    return Activity(type="message", text=RESET_QUESTION, attachments=[CardFactory.adaptive_card(reset_question_card())])


class ResetDialog(ComponentDialog):
    """Asks before forgetting; the answer is the next message. Only a yes or a no reaches
    :meth:`_act`: any other message ends the question (:meth:`CommandDialogs.handle`)."""

    def __init__(self, on_reset: OnReset) -> None:
        super().__init__("reset")
        self._on_reset = on_reset
        self.add_dialog(ConfirmPrompt("confirm"))  # only for questions asked before the upgrade
        self.add_dialog(WaterfallDialog("reset-steps", [self._ask, self._act]))
        self.initial_dialog_id = "reset-steps"

    async def _ask(self, step: WaterfallStepContext) -> DialogTurnResult:
        await step.context.send_activity(reset_question(step.context.activity.channel_id))
        return Dialog.end_of_turn

    async def _act(self, step: WaterfallStepContext) -> DialogTurnResult:
        confirmed = bool(step.context.turn_state.get(RESET_ANSWER))
        if confirmed:
            step.context.turn_state[RESET_CONFIRMED] = True
            await self._on_reset(step.context)
        else:
            await step.context.send_activity("OK, I kept everything.")
        return await step.end_dialog(confirmed)


class CommandDialogs:
    """Routes a message to a command or an active dialog; returns whether it was handled."""

    def __init__(self, conversation_state: ConversationState, help_text: Callable[[], str], on_reset: OnReset,
                 list_jobs: ListJobs, cancel_job: CancelJob, jobs_card: JobsCard) -> None:
        self._state = conversation_state
        self._help_text = help_text
        self._list_jobs = list_jobs
        self._jobs_card = jobs_card
        self._cancel_job = cancel_job
        self._dialogs = DialogSet(conversation_state.create_property("DialogState"))
        self._dialogs.add(ResetDialog(on_reset))

    @staticmethod
    def answers_inline(text: str) -> bool:
        """Whether :meth:`handle` may answer ``text`` itself (a command, or a yes / no to the reset
        question), judged from the text alone: anything else goes to the agent."""
        command = normalise_command(text)
        return (command in ("help", "reset", "jobs", "list jobs") or bool(_CANCEL.match(command))
                or text.strip().startswith("/") or reset_answer(text) is not None)

    async def handle(self, turn_context: TurnContext, text: str, requester: Requester | None = None) -> bool:
        """``requester``: who sent the message (cancel rights; what the jobs list shows them)."""
        requester = requester or Requester()
        dialog_context = await self._dialogs.create_context(turn_context)
        try:
            if dialog_context.active_dialog is not None:  # the reset question is pending
                if (answer := reset_answer(text)) is not None:
                    turn_context.turn_state[RESET_ANSWER] = answer
                    await dialog_context.continue_dialog()
                    return True
                # Anything else ends the question silently and is answered as usual, so the bot
                # never looks stuck; the user can say `reset` again.
                await dialog_context.cancel_all_dialogs()
            command = normalise_command(text)
            if command == "help":
                await turn_context.send_activity(MessageFactory.text(self._help_text()))
                return True
            if command == "reset":
                await dialog_context.begin_dialog("reset")
                return True
            if command in ("jobs", "list jobs"):
                jobs = await self._list_jobs(_key(turn_context))
                await turn_context.send_activity(Activity(
                    type="message", summary=f"{len(jobs)} background job(s)",
                    attachments=[CardFactory.adaptive_card(self._jobs_card(jobs, requester))]))
                return True
            if match := _CANCEL.match(command):
                key = _key(turn_context)
                reply = await cancel_reply(self._cancel_job, key, match.group("id"), requester)
                await turn_context.send_activity(reply)
                return True
            if text.strip().startswith("/"):
                known = ", ".join(f"`{name}`" for name in COMMANDS)
                await turn_context.send_activity(MessageFactory.text(
                    f"I don't know the command `{text.strip()[:40]}`. Commands I know: {known}. "
                    "Anything else you type goes to the assistant."))
                return True
            return False
        finally:
            if turn_context.turn_state.get(RESET_CONFIRMED):  # forget the dialog state too (finding 12)
                await self._state.delete(turn_context)
            else:
                await self._state.save_changes(turn_context)
