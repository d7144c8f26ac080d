"""Polling for a condition in end-to-end tests, with a message that says what never happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def poll(condition: Callable[[], Any], timeout: float) -> bool:
    """Poll ``condition`` every 50 ms for up to ``timeout`` seconds; whether it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    """:func:`poll`, and an AssertionError naming ``what`` if it never became true."""
    if not poll(condition, timeout):
        raise AssertionError(f"not within {timeout} s: {what}")
