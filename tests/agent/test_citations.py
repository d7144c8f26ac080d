"""Tool sources as Teams citations (agent/citations.py): within Teams' limits, untrusted text clipped."""

from __future__ import annotations

import json

from agent.citations import MAX_CITATIONS, citations_from_results, with_markers
from agent.outgoing import TEAMS_MESSAGE_BYTES, activity_bytes
from agent.processor import model_replies
from agent.turns import TurnOutcome
from runtime.protocol import StreamOutcome
from runtime.untrusted import delimit_tool_output


def result(data: object) -> str:
    return delimit_tool_output(json.dumps(data))


def test_at_most_twenty_citations_only_http_urls_and_clipped_texts() -> None:
    sources = [{"title": f"T{n}" + "x" * 200, "url": f"https://e.example/{n}", "abstract": "a" * 400,
                "keywords": [f"k{i}" * 20 for i in range(5)]} for n in range(30)]
    sources[0]["url"] = "file:///etc/passwd"
    found = citations_from_results([result({"citations": sources})])
    assert len(found) == MAX_CITATIONS
    assert [c["position"] for c in found] == list(range(1, 21))
    first = found[0]["appearance"]
    assert "url" not in first and len(first["name"]) == 80 and len(first["abstract"]) == 160
    assert len(first["keywords"]) == 3 and all(len(k) <= 28 for k in first["keywords"])
    assert found[1]["appearance"]["url"] == "https://e.example/1"


def test_mcp_resource_links_are_sources_and_junk_is_not() -> None:
    mcp = [{"type": "text", "text": "see the links"},
           {"type": "resource_link", "uri": "https://docs.example/a", "name": "Doc A", "description": "About A"},
           {"type": "resource_link", "uri": "https://docs.example/b"}]  # no name: dropped
    found = citations_from_results([result(mcp), "not json", result({"citations": "nope"}), result([1, 2])])
    assert found == [{"@type": "Claim", "position": 1, "appearance": {
        "@type": "DigitalDocument", "name": "Doc A", "abstract": "About A", "url": "https://docs.example/a"}}]


def test_the_reply_carries_the_citations_it_names_or_all_with_markers_added() -> None:
    found = citations_from_results([result({"citations": [{"title": "A"}, {"title": "B"}]})])
    text, used = with_markers("Only B matters [2].", found)
    assert text == "Only B matters [2]." and [c["position"] for c in used] == [2]
    text, used = with_markers("No markers here.", found)
    assert text == "No markers here.\n\n[1] [2]" and used == found
    assert with_markers("Plain.", []) == ("Plain.", [])


def test_a_long_answer_keeps_only_the_citations_that_fit_one_message() -> None:
    sources = [{"title": "T" * 80, "url": "https://e.example/" + "p" * 480, "abstract": "a" * 160}
               for _ in range(20)]
    found = citations_from_results([result({"citations": sources})])
    assert len(found) == 20
    [short] = model_replies(TurnOutcome(state={}, replies=["Short [1]."], citations=found), StreamOutcome())
    assert len(short["entities"][0]["citation"]) == 1  # only the one it names
    long_text = "word " * 2300 + " ".join(f"[{n}]" for n in range(1, 21))
    replies = model_replies(TurnOutcome(state={}, replies=[long_text], citations=found), StreamOutcome())
    assert all(activity_bytes(a) <= TEAMS_MESSAGE_BYTES for a in replies)
    kept = replies[-1]["entities"][0].get("citation", [])
    assert 0 < len(kept) < 20 and [c["position"] for c in kept] == list(range(1, len(kept) + 1))
