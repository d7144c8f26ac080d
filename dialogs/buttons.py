"""Buttons that answer for the user, and the reset question's card (plain Adaptive Card JSON).

They live with the dialogs because the reset dialog asks with them; the edge's other cards
(bot/cards.py) build on :func:`adaptive_card` and :func:`say_action` too.
"""

from __future__ import annotations

from typing import Any

from runtime.protocol import JSON


def adaptive_card(body: list[JSON], actions: list[JSON] | None = None) -> JSON:
    """An Adaptive Card 1.5 (Teams desktop, web and mobile) with this body and these actions."""
    card: JSON = {"type": "AdaptiveCard", "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                  "version": "1.5", "body": body}
    if actions:
        card["actions"] = actions
    return card


#: Where a "say" button puts its words: the message its press sends carries them in
#: ``Activity.value`` (the button's ``data``) and no text; :func:`said_text` reads them back.
SAY_KEY = "say"


def say_action(title: str, text: str, **extra: Any) -> JSON:
    """A button that says ``text`` for the user, as if they had typed it.

    A plain ``Action.Submit`` whose data the bot reads: Teams and the Agents Playground both
    send it as a message with ``value`` = data. Not ``imBack`` (the Playground refuses it:
    "Action type imBack is not supported yet"), and no ``msteams`` key in the data (pressing an
    Action.Submit whose data has one throws in the Playground's card renderer, so nothing is sent).
    """
    return {"type": "Action.Submit", "title": title, **extra, "data": {SAY_KEY: text}}


def said_text(value: Any) -> str | None:
    """The words of a :func:`say_action` click from ``Activity.value``, else None."""
    if isinstance(value, dict) and isinstance(value.get(SAY_KEY), str):
        return str(value[SAY_KEY])
    return None


#: The words the reset question's buttons say; typing them works as well.
RESET_YES, RESET_NO = "yes", "no"


def reset_question_card(question: str | None = None) -> JSON:
    """Yes / No for "forget this conversation?", under ``question`` when the card carries it."""
    body: list[JSON] = [{"type": "TextBlock", "text": question, "wrap": True}] if question else []
    return adaptive_card(body, [say_action("Yes", RESET_YES, style="destructive"), say_action("No", RESET_NO)])
