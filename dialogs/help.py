"""What ``help`` says: the offline model's own guide, or a short one for a real model."""

from __future__ import annotations

from agent.offline_model import HELP_TEXT


def help_text(model_description: str, offline: bool) -> str:
    if offline:
        return HELP_TEXT
    return (
        f"I'm an AI assistant ({model_description}). Ask me anything; long tasks such as "
        "activating a phone line run in the background and I message you when they finish.\n\n"
        "Commands: `help`, `reset` (forget this conversation). Ask me about your jobs in plain words."
    )
