"""Reading the JSON body of ``POST /api/messages`` within bounds: size, time and nesting depth.

- Size: ``Content-Length`` over the limit is refused before anything is read, and aiohttp stops a
  longer body at the same limit (``client_max_size``): 413.
- Time: a client that trickles its body (one byte every few seconds) would otherwise hold a
  request open for ever; the whole body must arrive within ``BODY_READ_TIMEOUT_SECONDS``: 408.
- Depth: Python's JSON parser recurses, so a 100,000-deep ``[[[[...`` raises ``RecursionError``
  (a 500), and even a parsable deep structure makes every later step (validation, botbuilder's
  deserialisation, the stores' JSON encoding) recurse as deep. Deeper than ``MAX_JSON_DEPTH``: 400.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web


class BodyRejected(Exception):
    """The body cannot be taken: the HTTP status and what to tell the client."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail = status, title, detail


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest deeper than ``limit`` in ``value`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


async def read_json_body(request: web.Request, *, max_bytes: int, timeout: float, max_depth: int) -> Any:
    """The parsed body, or :class:`BodyRejected` (413, 408 or 400)."""
    too_large = BodyRejected(413, "activity too large", f"the limit is {max_bytes} bytes")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        raise BodyRejected(408, "request timeout", f"the body did not arrive within {timeout:g} s "
                           "(BODY_READ_TIMEOUT_SECONDS)") from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    too_deep = BodyRejected(400, "the body is nested too deeply",
                            f"arrays and objects may nest at most {max_depth} levels deep (MAX_JSON_DEPTH)")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except (ValueError, UnicodeDecodeError):
        raise BodyRejected(400, "the body is not valid JSON", "") from None
    if json_depth_exceeds(body, max_depth):
        raise too_deep
    return body
