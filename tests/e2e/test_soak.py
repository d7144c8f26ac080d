"""The crash soak in short form (``make soak`` runs the long one): SIGKILL at random moments."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[2] / "scripts" / "soak.py")
assert _spec is not None and _spec.loader is not None
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak  # dataclasses look their module up there
_spec.loader.exec_module(soak)


def test_random_sigkills_lose_nothing(tmp_path: Path) -> None:
    report = soak.run_soak(kills=6, conversations=4, seed=11, data_dir=tmp_path, progress=False)
    print(report.summary())
    assert report.kills == 6 and report.messages > 20 and report.jobs > 3
    assert report.lost == [], report.summary()
    assert report.unloadable == []
    # Only the send-then-mark window may repeat a message: at most one per conversation per kill.
    assert report.duplicates <= report.kills * report.conversations
