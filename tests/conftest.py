"""Suite-wide fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blockbuster import BlockBuster, blockbuster_ctx


@pytest.fixture
def blockbuster() -> Iterator[BlockBuster]:
    """Fail the test if anything blocks the event loop (sync file, socket or sleep calls).

    Used autouse in the packages whose code runs on the loop in-process (see their conftest).
    """
    with blockbuster_ctx() as bb:
        # Import-time and logging I/O of dependencies is not ours to police.
        for name in ("io.TextIOWrapper.write", "io.BufferedWriter.write"):
            if name in bb.functions:
                bb.functions[name].can_block_in("logging/__init__.py", {"emit", "flush"})
        yield bb
