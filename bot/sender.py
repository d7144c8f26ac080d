"""Proactive delivery: outbox messages and typing indicators, each one call of the Bot Connector API.

Botbuilder's ``CloudAdapter.continue_conversation`` ran a turn through the middleware pipeline and
msrest's connector client (``requests`` in a worker thread) for every send: 2.5-4 ms of CPU a turn
(issue 17). The sender now makes the same request itself (bot/connector_api.py, one keep-alive
aiohttp session) with the same credentials: the adapter's credentials factory (bot/auth.py
``CachingCredentialFactory``, which keeps the token fresh off the event loop) and the header their
``signed_session`` sets (a bearer token; none in local mode, without an app id)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from typing import Any

import aiohttp
from botbuilder.integration.aiohttp import CloudAdapter
from botbuilder.schema import ActivityTypes
from botframework.connector.auth import ConnectorFactory

from bot.connector_api import BotConnector, ConnectorError
from bot.connector_clients import factory_credentials
from bot.service_urls import ServiceUrlPolicy
from runtime import metrics
from runtime.protocol import DeliveryError
from storage.abc import JSON

log = logging.getLogger(__name__)

PERMANENT_STATUSES = {400, 401, 403, 404, 405, 413}  # retrying cannot help; 403/404: the bot was removed


class _SignedHeaders:
    """What ``AppCredentials.signed_session`` writes to: the headers of a session (only those)."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}


class ProactiveSender:
    """Implements ``runtime.protocol.MessageSender`` with the Bot Connector API (bot/connector_api.py).

    Transient failures (429, 5xx, timeouts, dropped connections, no token) are retried a few times
    here with backoff honouring Retry-After; if they persist a transient DeliveryError lets the
    processor retry later. 400, 401, 403, 404, 405 and 413 are permanent (PERMANENT_STATUSES); other 4xx are retried.
    """

    def __init__(self, adapter: CloudAdapter, app_id: str, *, service_urls: ServiceUrlPolicy, attempts: int = 4,
                 base_delay: float = 0.5, max_delay: float = 30.0, per_conversation_per_second: int = 7,
                 timeout: float = 30.0, connector: BotConnector | None = None) -> None:
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
        self._connector = connector or BotConnector()

    async def close(self) -> None:
        """At shutdown, after the worker stopped: close the connector session."""
        await self._connector.close()

    async def _authorization(self, service_url: str) -> str | None:
        """The Authorization header botbuilder's connector client sent: the credentials the adapter's
        factory hands out now (asking each time lets it renew the token off the loop), signed as
        ``AppCredentials.signed_session`` signs (``Bearer <token>``; none without an app id)."""
        if self._connectors is None:
            adapter: Any = self._adapter
            claims = adapter.create_claims_identity(self._app_id)
            self._connectors = adapter.bot_framework_authentication.create_connector_factory(claims)
        credentials = await factory_credentials(self._connectors, None)
        if credentials is None:  # another factory: its client's credentials
            credentials = (await self._connectors.create(service_url, None)).config.credentials
        signed = _SignedHeaders()
        credentials.signed_session(signed)  # the token: an MSAL cache hit, or bot.auth.OutboundTokenError
        return signed.headers.get("Authorization")

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
        service_url = reference.get("serviceUrl")
        if not self._service_urls.check(service_url, where="send",
                                        consequence="not sending to the conversation's stored reference"):
            raise DeliveryError("the stored conversation reference names an untrusted serviceUrl "
                                "(TRUSTED_SERVICE_URLS)", permanent=True)
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    authorization = await self._authorization(str(service_url))
                except Exception as exc:  # OutboundTokenError: Entra ID refused or did not answer; later may work
                    metrics.connector_error("error")
                    raise DeliveryError(f"no Authorization for the connector: {exc}", permanent=False) from exc
                return await self._connector.send(reference, activity, update_id=update_id,
                                                  authorization=authorization)
        except TimeoutError as exc:
            metrics.connector_error("timeout")
            raise DeliveryError(f"connector did not answer within {self._timeout:g} s", permanent=False) from exc
        except (aiohttp.ClientError, OSError) as exc:
            metrics.connector_error("unreachable")
            raise DeliveryError(f"connector unreachable: {exc}", permanent=False) from exc
        except ConnectorError as exc:
            metrics.connector_error(str(exc.status))
            raise DeliveryError(f"connector answered {exc.status}: {exc}", permanent=exc.status in PERMANENT_STATUSES,
                                retry_after=exc.retry_after) from exc
        except ValueError as exc:  # a stored reference without a conversation: no retry can help
            metrics.connector_error("error")
            raise DeliveryError(f"cannot send: {exc}", permanent=True) from exc
