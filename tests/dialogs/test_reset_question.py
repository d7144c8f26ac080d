"""The reset question: what answers it, and what its buttons send."""

from __future__ import annotations

import pytest

from bot.cards import welcome_card
from dialogs.buttons import said_text, say_action
from dialogs.commands import reset_answer, reset_question


@pytest.mark.parametrize(("text", "answer"), [
    ("yes", True), ("Yes!", True), ("/yes", True), ("ok", True), ("no", False), ("No.", False), ("nope", False),
    ("jobs", None), ("what is my name?", None), ("reset", None), ("yes, but what is my name?", None), ("", None),
])
def test_only_a_yes_or_a_no_answers_it(text: str, answer: bool | None) -> None:
    assert reset_answer(text) is answer


def test_buttons_send_their_words_as_action_submit_data() -> None:
    button = say_action("Help", "help")
    assert button["type"] == "Action.Submit" and "msteams" not in button["data"]  # both throw in the Playground
    assert said_text(button["data"]) == "help"
    assert said_text({"action": "cancelJob", "jobId": "0" * 12}) is None and said_text("help") is None


def test_the_question_is_one_card_in_teams_and_text_with_buttons_elsewhere() -> None:
    teams = reset_question("msteams")
    assert teams.text is None
    [card] = teams.attachments
    assert "Reset?" in card.content["body"][0]["text"]
    assert [said_text(a["data"]) for a in card.content["actions"]] == ["yes", "no"]
    emulator = reset_question("emulator")
    assert "Reset?" in (emulator.text or "") and emulator.attachments[0].content["body"] == []


def test_the_welcome_card_has_a_button_per_example_and_help() -> None:
    card = welcome_card(True, examples=["activate line 555-0100", "time in Europe/Paris"])
    assert [(a["title"], said_text(a["data"])) for a in card["actions"]] == [
        ("Try: activate line 555-0100", "activate line 555-0100"),
        ("Try: time in Europe/Paris", "time in Europe/Paris"),
        ("Help", "help")]
    assert [a["title"] for a in welcome_card(False)["actions"]] == ["Help"]
