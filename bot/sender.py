"""Proactive delivery: outbox messages and typing indicators, each a proactive botbuilder turn.

What ``CloudAdapter.continue_conversation`` does, minus two costs it pays per message (issue 17,
bench/profiling.md): a new ``ConnectorClient`` (and msrest configuration) for every send, and a
``UserTokenClient`` a proactive send never uses. The connector client is kept per service URL and
reused while the credentials factory hands out the same credentials object (whose token the
factory keeps fresh off the event loop, bot/auth.py ``CachingCredentialFactory``); the turn still
runs through the adapter's middleware pipeline with ``turn_context.send_activity``, as before."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from typing import Any, ClassVar

import aiohttp
from botbuilder.core import TurnContext
from botbuilder.core.cloud_adapter_base import CloudAdapterBase
from botbuilder.core.conversation_reference_extension import get_continuation_activity
from botbuilder.integration.aiohttp import CloudAdapter
from botbuilder.schema import Activity, ActivityTypes, ConversationReference, Entity
from botframework.connector.aio import ConnectorClient
from botframework.connector.auth import ConnectorFactory

from bot.service_urls import ServiceUrlPolicy
from runtime import metrics
from runtime.protocol import DeliveryError
from storage.abc import JSON

log = logging.getLogger(__name__)

PERMANENT_STATUSES = {400, 401, 403, 404, 405, 413}  # retrying cannot help; 403/404: the bot was removed


class _Entity(Entity):
    """An entity with all its fields: botbuilder's ``Entity`` serialises only ``type``, which would
    strip streaminfo, the AI label and citations (issue 15) from what the bot sends."""

    _attribute_map: ClassVar[dict[str, Any]] = {**Entity._attribute_map,
                                                "additional_properties": {"key": "", "type": "{object}"}}


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
    """Implements ``runtime.protocol.MessageSender`` on botbuilder's CloudAdapter.

    Transient failures (429, 5xx, timeouts, dropped connections) are retried a few times here
    with backoff honouring Retry-After; if they persist a transient DeliveryError lets the
    processor retry later. 400, 401, 403, 404, 405 and 413 are permanent (PERMANENT_STATUSES); other 4xx are retried.
    """

    def __init__(self, adapter: CloudAdapter, app_id: str, *, service_urls: ServiceUrlPolicy, attempts: int = 4,
                 base_delay: float = 0.5, max_delay: float = 30.0, per_conversation_per_second: int = 7,
                 timeout: float = 30.0) -> None:
        self._adapter = adapter
        self._service_urls = service_urls
        self._app_id = app_id
        self._attempts = attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._rate = per_conversation_per_second
        self._timeout = timeout  # a connector that hangs must not hold the conversation's outbox
        self._recent: dict[str, deque[float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._connectors: ConnectorFactory | None = None
        self._clients: dict[str, ConnectorClient] = {}  # service URL -> its connector client

    async def _client(self, service_url: str) -> ConnectorClient:
        """The connector client for ``service_url``: built once, reused while its credentials are the ones the
        factory hands out now (asking it each time lets it renew the token off the loop, as it did per send)."""
        factory = self._connectors
        assert factory is not None
        impl: Any = factory
        credentials_factory = getattr(impl, "_credential_factory", None)  # botbuilder's _ConnectorFactoryImpl
        if credentials_factory is None:  # another factory: no reuse, as continue_conversation does
            return await factory.create(service_url, None)
        credentials = await credentials_factory.create_credentials(
            impl._app_id, impl._to_channel_from_bot_oauth_scope, impl._login_endpoint, impl._validate_authority)
        client = self._clients.get(service_url)
        if client is None or client.config.credentials is not credentials:
            client = await factory.create(service_url, None)
            if len(self._clients) >= 64:  # a handful of service URLs in practice (TRUSTED_SERVICE_URLS)
                self._clients.clear()
            self._clients[service_url] = client
        return client

    async def _proactive(self, reference: ConversationReference, logic: Any) -> None:
        """``CloudAdapter.continue_conversation(reference, logic, app_id)`` with a reused connector client and
        no user token client."""
        adapter: CloudAdapterBase = self._adapter
        claims = adapter.create_claims_identity(self._app_id)
        if self._connectors is None:
            self._connectors = adapter.bot_framework_authentication.create_connector_factory(claims)
        activity = get_continuation_activity(reference)
        client = await self._client(str(activity.service_url))
        context = adapter._create_turn_context(activity, claims, None, client, None, logic,
                                               self._connectors)
        await adapter.run_pipeline(context, logic)

    async def send(self, reference: JSON, activity: JSON) -> str | None:
        return await self._with_retries(reference, activity, None)

    async def update(self, reference: JSON, activity_id: str, activity: JSON) -> None:
        """Replace a message the bot sent earlier (e.g. a live job card)."""
        await self._with_retries(reference, activity, activity_id)

    async def _pace(self, reference: JSON) -> None:
        """Teams allows about 7 messages per second per conversation: wait for a slot (no pacing at 0)."""
        if self._rate <= 0:
            return
        key = str((reference.get("conversation") or {}).get("id"))
        recent = self._recent.setdefault(key, deque())
        async with self._locks.setdefault(key, asyncio.Lock()):
            while len(recent) >= self._rate and (wait := recent[0] + 1.0 - time.monotonic()) > 0:
                await asyncio.sleep(wait)
                while recent and recent[0] <= time.monotonic() - 1.0:
                    recent.popleft()
            while len(recent) >= self._rate:
                recent.popleft()
            recent.append(time.monotonic())

    async def _with_retries(self, reference: JSON, activity: JSON, update_id: str | None) -> str | None:
        last: DeliveryError | None = None
        for attempt in range(1, self._attempts + 1):
            try:
                await self._pace(reference)
                return await self._send_once(reference, activity, update_id)
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
        if not self._service_urls.allows(reference.get("serviceUrl")):
            return  # best effort, every 3 s: the turn's messages say (once each) why nothing is sent
        await self._send_once(reference, {"type": ActivityTypes.typing}, None)

    async def _send_once(self, reference: JSON, activity: JSON, update_id: str | None) -> str | None:
        # A reference stored before TRUSTED_SERVICE_URLS, or by whoever can write the store: no connection,
        # and so never the bot's token, to a connector the policy does not trust.
        if not self._service_urls.check(reference.get("serviceUrl"), where="send",
                                        consequence="not sending to the conversation's stored reference"):
            raise DeliveryError("the stored conversation reference names an untrusted serviceUrl "
                                "(TRUSTED_SERVICE_URLS)", permanent=True)
        conversation_reference = ConversationReference().deserialize(reference)
        outgoing = Activity().deserialize(activity)
        if isinstance(activity.get("entities"), list):
            outgoing.entities = [_Entity().deserialize(e) for e in activity["entities"] if isinstance(e, dict)]
        outcome: dict[str, Any] = {}

        async def deliver(turn_context: TurnContext) -> None:
            # Errors are caught here so they reach us, not the adapter's on_turn_error.
            try:
                if update_id is not None:
                    outgoing.id = update_id
                    outgoing.conversation = turn_context.activity.conversation
                    response = await turn_context.update_activity(outgoing)
                else:
                    response = await turn_context.send_activity(outgoing)
                outcome["id"] = response.id if response else None
            except Exception as exc:
                outcome["error"] = exc

        try:
            async with asyncio.timeout(self._timeout):
                await self._proactive(conversation_reference, deliver)
        except TimeoutError as exc:
            metrics.connector_error("timeout")
            raise DeliveryError(f"connector did not answer within {self._timeout:g} s", permanent=False) from exc
        except (aiohttp.ClientError, OSError) as exc:
            metrics.connector_error("unreachable")
            raise DeliveryError(f"connector unreachable: {exc}", permanent=False) from exc
        error = outcome.get("error")
        if error is None:
            return outcome.get("id")
        if isinstance(error, aiohttp.ClientError | TimeoutError | OSError):
            metrics.connector_error("unreachable")
            raise DeliveryError(f"connector unreachable: {error}", permanent=False) from error
        status, retry_after = _status_and_retry_after(error)
        metrics.connector_error(str(status or "error"))
        permanent = status in PERMANENT_STATUSES
        raise DeliveryError(f"connector answered {status or 'an error'}: {error}", permanent=permanent,
                            retry_after=retry_after) from error
