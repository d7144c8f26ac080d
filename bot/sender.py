"""Proactive delivery: outbox messages and typing indicators leave through continue_conversation."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import aiohttp
from botbuilder.core import TurnContext
from botbuilder.integration.aiohttp import CloudAdapter
from botbuilder.schema import Activity, ActivityTypes, ConversationReference

from agent.processor import DeliveryError
from storage.abc import JSON

log = logging.getLogger(__name__)

PERMANENT_STATUSES = {400, 401, 403, 404, 405, 413}  # retrying cannot help; 403/404: the bot was removed


def _status_and_retry_after(error: BaseException) -> tuple[int | None, float | None]:
    response: Any = getattr(error, "response", None)
    status = getattr(response, "status_code", None) or getattr(error, "status", None)
    retry_after: float | None = None
    headers = getattr(response, "headers", None) or {}
    raw = headers.get("Retry-After") if hasattr(headers, "get") else None
    if raw:
        try:
            retry_after = float(raw)
        except ValueError:
            retry_after = None
    return (int(status) if status else None), retry_after


class ProactiveSender:
    """Implements ``agent.processor.MessageSender`` on botbuilder's CloudAdapter.

    Transient failures (429, 5xx, timeouts, dropped connections) are retried a few times here
    with backoff honouring Retry-After; if they persist a transient DeliveryError lets the
    processor retry later. 4xx other than 429 are permanent.
    """

    def __init__(self, adapter: CloudAdapter, app_id: str, *, attempts: int = 4, base_delay: float = 0.5,
                 max_delay: float = 30.0) -> None:
        self._adapter = adapter
        self._app_id = app_id
        self._attempts = attempts
        self._base_delay = base_delay
        self._max_delay = max_delay

    async def send(self, reference: JSON, activity: JSON) -> str | None:
        last: DeliveryError | None = None
        for attempt in range(1, self._attempts + 1):
            try:
                return await self._send_once(reference, activity)
            except DeliveryError as exc:
                if exc.permanent:
                    raise
                last = exc
                if attempt == self._attempts:
                    break
                delay = exc.retry_after if exc.retry_after is not None else self._base_delay * 2 ** (attempt - 1)
                delay = min(self._max_delay, delay) * random.uniform(1.0, 1.2)
                log.info("delivery attempt %d failed (%s); retrying in %.2f s", attempt, exc, delay)
                await asyncio.sleep(delay)
        assert last is not None
        raise last

    async def typing(self, reference: JSON) -> None:
        await self._send_once(reference, {"type": ActivityTypes.typing})

    async def _send_once(self, reference: JSON, activity: JSON) -> str | None:
        conversation_reference = ConversationReference().deserialize(reference)
        outgoing = Activity().deserialize(activity)
        outcome: dict[str, Any] = {}

        async def deliver(turn_context: TurnContext) -> None:
            # Errors are caught here so they reach us, not the adapter's on_turn_error.
            try:
                response = await turn_context.send_activity(outgoing)
                outcome["id"] = response.id if response else None
            except Exception as exc:
                outcome["error"] = exc

        try:
            await self._adapter.continue_conversation(conversation_reference, deliver, self._app_id)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DeliveryError(f"connector unreachable: {exc}", permanent=False) from exc
        error = outcome.get("error")
        if error is None:
            return outcome.get("id")
        if isinstance(error, aiohttp.ClientError | TimeoutError | OSError):
            raise DeliveryError(f"connector unreachable: {error}", permanent=False) from error
        status, retry_after = _status_and_retry_after(error)
        permanent = status in PERMANENT_STATUSES
        raise DeliveryError(f"connector answered {status or 'an error'}: {error}", permanent=permanent,
                            retry_after=retry_after) from error
