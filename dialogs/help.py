"""What ``help`` says: the offline model's own guide, or a short one for a real model; both list the
example prompts the declared tools give (TOOL_MODULES)."""

from __future__ import annotations

from collections.abc import Sequence

from agent.offline_model import help_text as offline_help
from jobs.registry import DeclaredTool


def help_text(model_description: str, offline: bool, tools: Sequence[DeclaredTool] = ()) -> str:
    if offline:
        return offline_help(tools)
    tries = "".join(f"\n- `{t.example}`" for t in tools if t.example)
    return (
        f"I'm an AI assistant ({model_description}). Ask me anything; long tasks run in the "
        "background and I message you when they finish.\n\n"
        + (f"For example:{tries}\n\n" if tries else "")
        + "Commands: `help`, `reset` (forget this conversation). Ask me about your jobs in plain words."
    )
