"""Sources a tool returned, as Teams citations (msteams-docs ``bot-messages-ai-generated-content``).

A tool result carries sources when it is JSON with a ``citations`` list (``{"title" or "name",
"url", "abstract" or "snippet", "keywords"}``) or an MCP result with ``resource_link`` blocks
(``uri``, ``name``, ``description``). Each becomes a ``Claim`` whose ``appearance`` is a
``DigitalDocument``, numbered from 1; the reply's text refers to them by ``[n]`` markers.

Tool output is untrusted (runtime/untrusted.py): only http(s) URLs are kept, every text is
stripped of control characters and clipped to Teams' limits (at most 20 citations; a name of 80
characters, an abstract of 160, at most 3 keywords of 28), and a source without a usable title is
dropped. A message keeps only as many citations as fit Teams' message size (agent/processor.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from runtime.untrusted import tool_output_data

MAX_CITATIONS = 20
MAX_NAME = 80
MAX_ABSTRACT = 160
MAX_KEYWORDS = 3
MAX_KEYWORD = 28
MAX_URL = 500

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069]+")
_MARKER = re.compile(r"\[(\d{1,2})\]")


def _clean(value: Any, limit: int) -> str:
    text = _CONTROL.sub(" ", str(value or "")).strip()
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _url(value: Any) -> str | None:
    text = str(value or "").strip()
    if len(text) > MAX_URL or _CONTROL.search(text):
        return None
    try:
        parts = urlsplit(text)
    except ValueError:
        return None
    return text if parts.scheme in ("http", "https") and parts.netloc else None


def _citation(position: int, name: Any, url: Any, abstract: Any, keywords: Any) -> dict[str, Any] | None:
    title = _clean(name, MAX_NAME)
    if not title:
        return None
    appearance: dict[str, Any] = {"@type": "DigitalDocument", "name": title,
                                  "abstract": _clean(abstract, MAX_ABSTRACT) or title}
    if (link := _url(url)) is not None:
        appearance["url"] = link
    if isinstance(keywords, list):
        words = [w for w in (_clean(k, MAX_KEYWORD) for k in keywords[:MAX_KEYWORDS]) if w]
        if words:
            appearance["keywords"] = words
    return {"@type": "Claim", "position": position, "appearance": appearance}


def _sources(data: Any) -> Iterable[tuple[Any, Any, Any, Any]]:
    if isinstance(data, dict) and isinstance(data.get("citations"), list):
        for c in data["citations"]:
            if isinstance(c, dict):
                yield (c.get("title") or c.get("name"), c.get("url"), c.get("abstract") or c.get("snippet"),
                       c.get("keywords"))
    elif isinstance(data, list):  # an MCP result: content blocks
        for block in data:
            if isinstance(block, dict) and block.get("type") == "resource_link":
                yield block.get("name") or block.get("title"), block.get("uri"), block.get("description"), None
            elif isinstance(block, dict) and block.get("type") == "text":
                try:
                    inner = json.loads(str(block.get("text") or ""))
                except ValueError:
                    continue
                yield from _sources(inner)


def citations_from_results(results: Iterable[str], start: int = 1) -> list[dict[str, Any]]:
    """The citations in tool results (their delimited, clipped text), numbered from ``start``."""
    found: list[dict[str, Any]] = []
    for content in results:
        try:
            data = json.loads(tool_output_data(content))
        except ValueError:
            continue
        for name, url, abstract, keywords in _sources(data):
            if start + len(found) > MAX_CITATIONS:
                return found
            if (citation := _citation(start + len(found), name, url, abstract, keywords)) is not None:
                found.append(citation)
    return found


def with_markers(text: str, citations: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The reply and the citations it carries: those its ``[n]`` markers name; if it names none,
    all of them, with their markers appended (the model did not cite, the sources still show)."""
    used = {int(n) for n in _MARKER.findall(text)}
    named = [c for c in citations if c["position"] in used]
    if named:
        return text, named
    if not citations:
        return text, []
    return text + "\n\n" + " ".join(f"[{c['position']}]" for c in citations), citations
