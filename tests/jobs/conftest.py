from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_blocking(blockbuster: object) -> None:
    """The agent runs on the event loop: any blocking call in a test here is a bug."""
