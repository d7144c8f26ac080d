"""A tool module for the citation tests (TOOL_MODULES=harness.sourced_tool): a plain tool whose
result carries ``citations``, some of them hostile (a script URL, control characters, a runaway
title, more than Teams shows).

Say ``look up durability``: the tool takes a second (so the answer streams) and the offline model
relays its ``message``, which cites ``[1]`` and ``[2]``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from jobs.registry import tool

SOURCES: list[dict[str, Any]] = [
    {"title": "Durable execution", "url": "https://example.com/durable", "abstract": "What survives a crash.",
     "keywords": ["durability", "a keyword far longer than twenty-eight characters", "inbox", "outbox"]},
    {"title": "The outbox\u202e pattern\x00", "url": "javascript:alert(1)", "snippet": "x" * 500},
    *({"title": f"Source {n}" + "!" * 100, "url": f"https://example.com/{n}"} for n in range(3, 26)),
]


@tool(example="look up durability", timeout=10, offline_phrase=re.compile(r"^look up (?P<topic>\w+)$", re.I))
async def look_up(topic: str) -> dict[str, Any]:
    """Look a topic up in the knowledge base; the answer cites its sources."""
    await asyncio.sleep(1.0)
    return {"message": f"Here is what I found about {topic}: the inbox keeps what you said [1], the outbox "
                       "what I answer [2].", "citations": SOURCES}
