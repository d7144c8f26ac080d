"""The layers: no import runs back up, AutoGen stays in agent/, botbuilder at the edge.

Edge (``bot/``, which imports ``dialogs/``) -> ``agent/`` -> ``jobs/`` -> ``storage/`` -> ``runtime/``;
``cluster/`` beside the stores. Every import in a module counts, wherever it is written (inside a
function, under ``TYPE_CHECKING``): read with :mod:`ast`, nothing is imported.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "storage", "cluster", "jobs", "agent", "dialogs", "bot")

#: package -> the packages of this repository it must not import (the layers above it).
FORBIDDEN = {
    "runtime": {"storage", "cluster", "jobs", "agent", "dialogs", "bot"},
    "storage": {"cluster", "jobs", "agent", "dialogs", "bot"},
    "cluster": {"storage", "jobs", "agent", "dialogs", "bot"},
    "jobs": {"agent", "dialogs", "bot"},
    "agent": {"dialogs", "bot"},
    "dialogs": {"bot"},
}
#: Third-party packages that belong to one layer only.
AUTOGEN = ("autogen_core", "autogen_agentchat", "autogen_ext")
BOTBUILDER = ("botbuilder",)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the product (not the tests, benchmarks or scripts): name -> file."""
    found = {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    found["app"] = ROOT / "app.py"
    return found


@cache
def imports(name: str) -> frozenset[str]:
    """The dotted names a module imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return frozenset(names)


def top(name: str) -> str:
    return name.partition(".")[0]


def in_repo(imported: str) -> list[str]:
    """The repository's modules an import runs: the module and the packages it is in."""
    known = modules()
    parts = imported.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in known]


def closure(name: str) -> set[str]:
    """The repository's modules importing ``name`` runs (itself included)."""
    seen, todo = set(), [*in_repo(name)]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(m for imported in imports(current) for m in in_repo(imported))
    return seen


def third_party(name: str, roots: tuple[str, ...]) -> list[str]:
    return sorted(i for i in imports(name) if top(i) in roots)


@pytest.mark.parametrize("name", sorted(m for m in modules() if top(m) in FORBIDDEN))
def test_no_import_runs_up_the_layers(name: str) -> None:
    upward = sorted(i for i in imports(name) if top(i) in FORBIDDEN[top(name)])
    assert not upward, f"{name} ({top(name)}/) imports a layer above it: {upward}"


@pytest.mark.parametrize("name", sorted(m for m in modules() if top(m) != "agent"))
def test_autogen_is_imported_in_agent_only(name: str) -> None:
    assert not third_party(name, AUTOGEN), f"{name} imports AutoGen; keep it in agent/"


@pytest.mark.parametrize("name", sorted(m for m in modules() if top(m) not in ("bot", "dialogs", "app")))
def test_botbuilder_is_imported_at_the_edge_only(name: str) -> None:
    assert not third_party(name, BOTBUILDER), f"{name} imports botbuilder; keep it in bot/ and dialogs/"


def test_the_durability_runtime_runs_no_autogen() -> None:
    """The processor, and every module of ours importing it runs, import no AutoGen: the turn
    reaches it through ``agent.turns.TurnRunner``."""
    pulled = {m: found for m in sorted(closure("agent.processor")) if (found := third_party(m, AUTOGEN))}
    assert not pulled, f"importing agent.processor runs AutoGen through: {pulled}"


def test_the_checks_see_the_imports() -> None:
    """A guard on the guard: the parser finds imports that are there (else every check passes)."""
    assert "runtime.protocol" in imports("agent.processor")
    assert "agent.turns.TurnRunner" in imports("agent.processor")
    assert third_party("agent.runner", AUTOGEN)
    assert third_party("bot.sender", BOTBUILDER)
    assert {"agent.processor", "agent.turns", "runtime.protocol", "storage.abc", "agent"} <= closure("agent.processor")
    assert "agent.runner" not in closure("agent.processor")


def _imported_tops(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(top(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(top(node.module))
    return found


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for folder in ("bench", "scripts", "harness")
                                        for p in (ROOT / folder).rglob("*.py")))
def test_the_shared_harness_never_reaches_into_the_tests(path: str) -> None:
    """Tests, benchmarks and the soak share ``harness/``; none of them but the tests imports ``tests``."""
    assert "tests" not in _imported_tops(ROOT / path), f"{path} imports tests/: use harness/"


@pytest.mark.parametrize("name", sorted(modules()))
def test_the_product_never_imports_the_harness(name: str) -> None:
    assert not [i for i in imports(name) if top(i) == "harness"], f"{name} imports the test harness"
