"""Tool sources as Teams citations (agent/citations.py): within Teams' limits, untrusted text clipped."""

from __future__ import annotations

import json

from agent.citations import MAX_CITATIONS, citations_from_results, with_markers
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
