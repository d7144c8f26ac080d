"""CommandDialogs routing, on botbuilder's TestAdapter (no app process, no HTTP): help, jobs, cancel,
unknown /commands, and the reset question, with dialog state in the durable store's items."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botbuilder.core import ConversationState, TurnContext
from botbuilder.core.adapters import TestAdapter
from botbuilder.schema import Activity, ChannelAccount, ConversationAccount

from bot.cards import jobs_list_card
from bot.dialog_storage import ConversationStoreStorage, dialog_item_key
from dialogs.commands import COMMANDS, CommandDialogs
from jobs.access import CancelRefusedError
from jobs.runner import CancelResult
from runtime.protocol import Requester
from storage.abc import JobNotFoundError, JobRecord
from storage.memory import MemoryStore

HELP = "I can chat, remember things and run background jobs."
JOB_ID = "0d73272971a7"
ADA = Requester(id="29:ada", name="Ada")
CONVERSATION = ConversationAccount(id="a:1personal-chat")
KEY = "msteams:a:1personal-chat"


class Bot:
    """A CommandDialogs over a MemoryStore, driven by a TestAdapter; records what the bot did."""

    def __init__(self, jobs: list[JobRecord] | None = None, cancel: Any = None) -> None:
        self.store = MemoryStore()
        self.jobs = jobs or []
        self.resets: list[str] = []
        self.cancels: list[tuple[str, str, Requester]] = []
        self.handled: list[bool] = []
        self._cancel = cancel
        self.dialogs = CommandDialogs(ConversationState(ConversationStoreStorage(self.store)), lambda: HELP,
                                      on_reset=self._on_reset, list_jobs=self._list_jobs, cancel_job=self._cancel_job,
                                      jobs_card=lambda jobs, viewer: jobs_list_card(jobs, viewer=viewer))
        self.adapter = TestAdapter(self._turn, Activity(
            channel_id="msteams", service_url="https://smba.trafficmanager.net/emea/", conversation=CONVERSATION,
            from_property=ChannelAccount(id=ADA.id, name=ADA.name), recipient=ChannelAccount(id="28:bot", name="Bot")))

    async def _turn(self, turn_context: TurnContext) -> None:
        self.handled.append(await self.dialogs.handle(turn_context, turn_context.activity.text or "", ADA))

    async def _on_reset(self, turn_context: TurnContext) -> None:
        self.resets.append(turn_context.activity.text or "")
        await turn_context.send_activity("Done: I forgot this conversation.")

    async def _list_jobs(self, key: str) -> list[JobRecord]:
        assert key == KEY
        return self.jobs

    async def _cancel_job(self, key: str, job_id: str, requester: Requester) -> CancelResult:
        self.cancels.append((key, job_id, requester))
        if self._cancel is not None:
            return await self._cancel(key, job_id, requester)  # type: ignore[no-any-return]
        return CancelResult(JobRecord(id=job_id, conversation_key=key, tool="t", arguments={}), already_finished=False)

    async def say(self, text: str) -> list[Activity]:
        """Send one message; the activities the bot sent in that turn."""
        self.adapter.activity_buffer.clear()
        await self.adapter.send(text)
        sent = list(self.adapter.activity_buffer)
        self.adapter.activity_buffer.clear()
        return sent

    async def dialog_state(self) -> dict[str, Any]:
        key = dialog_item_key(Activity(channel_id="msteams", conversation=CONVERSATION))
        return await self.store.read_items([key])


def texts(activities: list[Activity]) -> list[str]:
    return [a.text for a in activities if a.text]


def shown(activity: Activity) -> str:
    """Everything an activity shows, its text and its cards' (a question may come as a card)."""
    cards = [a.content for a in activity.attachments or ()]
    return f"{activity.text or ''} {json.dumps(cards, default=lambda o: getattr(o, '__dict__', str(o)))}"


@pytest.mark.parametrize("text", ["help", "HELP", "  /help ", "/Help"])
async def test_help_answers_with_the_help_text(text: str) -> None:
    bot = Bot()
    assert texts(await bot.say(text)) == [HELP]
    assert bot.handled == [True]


async def test_other_messages_are_left_for_the_agent() -> None:
    bot = Bot()
    for text in ("hello", "what is my name?", "help me with my phone line", "cancel everything"):
        assert await bot.say(text) == []
    assert bot.handled == [False] * 4 and bot.cancels == [] and bot.resets == []


async def test_jobs_lists_the_conversations_jobs_in_a_card() -> None:
    jobs = [JobRecord(id=JOB_ID, conversation_key=KEY, tool="activate_line", arguments={"n": "1"},
                      status="running", started_by={"id": "29:ada", "name": "Ada"})]
    for text in ("jobs", "list jobs", "/jobs"):
        [reply] = await Bot(jobs).say(text)
        assert reply.summary == "1 background job(s)"
        [attachment] = reply.attachments
        assert attachment.content_type == "application/vnd.microsoft.card.adaptive"
        assert JOB_ID in str(attachment.content)
    [empty] = await Bot().say("jobs")
    assert empty.summary == "0 background job(s)"


@pytest.mark.parametrize("text", [f"cancel {JOB_ID}", f"cancel job {JOB_ID}", f"/cancel `{JOB_ID}`",
                                  f"Cancel Job {JOB_ID.upper()}"])
async def test_cancel_asks_for_the_job_as_the_sender(text: str) -> None:
    bot = Bot()
    assert texts(await bot.say(text)) == [f"Cancelling job `{JOB_ID}`…"]
    assert bot.cancels == [(KEY, JOB_ID, ADA)]


async def test_cancel_says_when_there_is_no_such_job_or_it_is_not_theirs() -> None:
    async def missing(key: str, job_id: str, requester: Requester) -> CancelResult:
        raise JobNotFoundError(key, job_id)

    [reply] = texts(await Bot(cancel=missing).say(f"cancel {JOB_ID}"))
    assert reply.startswith(f"There is no job `{JOB_ID}` in this conversation")

    async def refused(key: str, job_id: str, requester: Requester) -> CancelResult:
        raise CancelRefusedError(JobRecord(id=job_id, conversation_key=key, tool="t", arguments={}),
                                 "Only Bob, who started it, or a bot admin can cancel it.")

    assert texts(await Bot(cancel=refused).say(f"cancel {JOB_ID}")) == [
        "Only Bob, who started it, or a bot admin can cancel it."]


async def test_cancel_of_something_that_is_not_a_job_id_is_not_a_command() -> None:
    bot = Bot()
    assert await bot.say("cancel my subscription") == []
    assert bot.handled == [False] and bot.cancels == []


async def test_an_unknown_slash_command_names_the_known_ones() -> None:
    bot = Bot()
    [reply] = texts(await bot.say("/frobnicate now"))
    assert "I don't know the command `/frobnicate now`" in reply
    assert all(f"`{name}`" in reply for name in COMMANDS)
    assert bot.handled == [True]
    [long] = texts(await bot.say("/" + "x" * 500))
    assert "x" * 40 not in long  # the echo is cut short


async def test_reset_asks_first_and_forgets_only_after_yes() -> None:
    bot = Bot()
    [question] = await bot.say("reset")
    assert "Reset?" in shown(question) and bot.resets == []
    assert await bot.dialog_state() != {}  # the pending question is stored durably
    assert texts(await bot.say("yes")) == ["Done: I forgot this conversation."]
    assert bot.resets == ["yes"]
    assert await bot.dialog_state() == {}  # a confirmed reset deletes the dialog state too
    assert texts(await bot.say("help")) == [HELP]  # and the next message is routed afresh


async def test_reset_answered_no_keeps_everything() -> None:
    bot = Bot()
    await bot.say("/reset")
    assert texts(await bot.say("no")) == ["OK, I kept everything."]
    assert bot.resets == [] and bot.handled == [True, True]
    assert texts(await bot.say("help")) == [HELP]  # the question is over
