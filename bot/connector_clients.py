"""Connector clients reused per service URL, instead of one built for every request.

botbuilder builds a ``ConnectorClient`` (an msrest client with its own configuration, pipeline and
``requests`` session) for every incoming activity, and a ``UserTokenClient`` beside it, whether
the turn sends anything or not: about 0.6 ms of CPU per activity in the turn benchmark
(bench/profiling.md). A client is kept while the credentials factory hands out the same
credentials object (bot/auth.py ``CachingCredentialFactory`` keeps one per app id, scope and
authority, and renews its token off the loop), so a client never outlives its credentials.
"""

from __future__ import annotations

from typing import Any

from botframework.connector.aio import ConnectorClient
from botframework.connector.auth import ConnectorFactory

#: A handful of service URLs in practice (TRUSTED_SERVICE_URLS); past this many the cache starts over.
MAX_CLIENTS = 64


async def factory_credentials(factory: ConnectorFactory, audience: str | None) -> Any | None:
    """The credentials ``factory.create`` would give a new client for ``audience`` (None: the bot's scope),
    asked of its credentials factory (which renews the token off the loop); None for a factory that is not
    botbuilder's ``_ConnectorFactoryImpl``, whose private fields this reads."""
    impl: Any = factory
    credentials_factory = getattr(impl, "_credential_factory", None)
    if credentials_factory is None:
        return None
    return await credentials_factory.create_credentials(
        impl._app_id, audience or impl._to_channel_from_bot_oauth_scope, impl._login_endpoint,
        impl._validate_authority)


class ConnectorClients:
    def __init__(self) -> None:
        self._clients: dict[tuple[str, str], ConnectorClient] = {}  # (service URL, audience) -> client

    async def get(self, factory: ConnectorFactory, service_url: str, audience: str | None) -> ConnectorClient:
        """``factory.create(service_url, audience)``, reused while its credentials are the current ones."""
        credentials = await factory_credentials(factory, audience)
        if credentials is None:  # another factory: a client each time, as botbuilder does
            return await factory.create(service_url, audience)
        key = (service_url, audience or "")
        client = self._clients.get(key)
        if client is None or client.config.credentials is not credentials:
            client = await factory.create(service_url, audience)
            if len(self._clients) >= MAX_CLIENTS:
                self._clients.clear()
            self._clients[key] = client
        return client
