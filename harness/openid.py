"""A local stand-in for the Bot Framework token service and Entra ID (AAD), and a token minter.

Real Bot Framework traffic carries a JWT signed with keys published at
``https://login.botframework.com/v1/.well-known/openidconfiguration``; the bot answers with a
token it gets from Entra ID (``login.microsoftonline.com``) through MSAL. Neither is reachable
in tests, so :class:`OpenIdServer` serves on loopback, over HTTPS (MSAL only accepts an https
authority) with a throw-away CA:

* the channel's OpenID metadata + JWKS (keys carry ``endorsements`` like the real ones),
* the Emulator's (AAD v2) OpenID metadata + JWKS,
* an MSAL-compatible tenant: ``/{tenant}/v2.0/.well-known/openid-configuration`` and the
  client-credentials token endpoint, which checks the bot's app id and secret.

Point the bot at it with :meth:`OpenIdServer.bot_env` (real botbuilder settings:
``TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL``, ``TO_CHANNEL_FROM_BOT_LOGIN_URL`` ...; plus
``REQUESTS_CA_BUNDLE`` so ``requests`` trusts the CA). :meth:`OpenIdServer.channel_token` and
friends mint tokens, valid or broken in one specific way each.

Like the RecordingConnector, the server runs in a background thread with its own loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import RSAAlgorithm

from harness.loop_thread import LoopServer

__all__ = ["CHANNEL_ISSUER", "EMULATOR_ISSUER_V1", "EMULATOR_ISSUER_V2", "OpenIdServer", "TokenRequest"]

#: ``iss`` of tokens the Bot Framework channel service sends to bots (public cloud).
CHANNEL_ISSUER = "https://api.botframework.com"
#: Issuers botbuilder treats as "from the Emulator" (AAD v1 / v2 tokens of the botframework.com tenant).
EMULATOR_ISSUER_V1 = "https://sts.windows.net/d6d49420-f39b-4df7-a1dc-d59a935871db/"
EMULATOR_ISSUER_V2 = "https://login.microsoftonline.com/d6d49420-f39b-4df7-a1dc-d59a935871db/v2.0"
#: Channels the published channel key is endorsed for (real keys list the channels they sign for).
DEFAULT_ENDORSEMENTS = ("msteams", "emulator", "webchat", "directline")


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost; returns (ca.pem, cert.pem, key.pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key, server_key = _rsa_key(), _rsa_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "durable-agent test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem(server_key))
    return ca_path, cert_path, key_path


@dataclass(frozen=True)
class TokenRequest:
    """One client-credentials token request the bot made (MSAL -> our token endpoint)."""

    tenant: str
    client_id: str
    scope: str
    secret_ok: bool
    status: int
    access_token: str | None


class OpenIdServer(LoopServer):
    """OpenID metadata + JWKS for the channel and the Emulator, and an MSAL token endpoint.

    Use as ``with OpenIdServer(tmp_dir, app_id=..., app_password=...) as idp:``.
    """

    TENANT = "botframework.com"
    scheme = "https"
    shutdown_timeout = 2.0

    def __init__(self, directory: Path, *, app_id: str, app_password: str, host: str = "127.0.0.1",
                 endorsements: tuple[str, ...] = DEFAULT_ENDORSEMENTS) -> None:
        self.app_id = app_id
        self.app_password = app_password
        super().__init__(host)
        self._directory = Path(directory)
        self._endorsements = list(endorsements)
        self.signing_key = _rsa_key()
        self.signing_kid = f"test-{uuid.uuid4().hex[:8]}"
        #: Not published anywhere: tokens signed with it must be rejected.
        self.rogue_key = _rsa_key()
        self._lock = threading.Lock()
        self._token_requests: list[TokenRequest] = []
        self._metadata_hits = 0
        self._metadata_delay = 0.0
        self._token_delay = 0.0
        self._server: asyncio.Server | None = None
        self._context: ssl.SSLContext | None = None
        self.ca_file: Path | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> Self:
        ca, cert, key = write_tls_material(self._directory)
        self.ca_file = ca
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        return super().start(timeout)

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/botframework/v1/.well-known/openidconfiguration", self._channel_metadata)
        app.router.add_get("/botframework/v1/keys", self._channel_keys)
        app.router.add_get("/common/v2.0/.well-known/openid-configuration", self._emulator_metadata)
        app.router.add_get("/common/discovery/v2.0/keys", self._emulator_keys)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._tenant_metadata)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        return app

    async def _listen(self, runner: web.AppRunner) -> int:
        assert runner.server is not None
        # Our own listener rather than a TCPSite, for a short TLS shutdown timeout: a client that keeps
        # an idle connection (MSAL's requests session does) must not leave a half-closed TLS transport
        # behind (a ResourceWarning in the tests) when the server stops.
        self._server = await asyncio.get_running_loop().create_server(
            runner.server, self._host, self._bind_port, ssl=self._context, ssl_shutdown_timeout=0.2)
        return int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await super()._shutdown()
        await asyncio.sleep(0.3)  # > ssl_shutdown_timeout: closing TLS transports are gone by now
        # Whatever is left (a handshake in progress, a peer that never closes ...): the selector loop
        # keeps every socket transport it runs (a private but long-standing attribute).
        for transport in list(getattr(asyncio.get_running_loop(), "_transports", {}).values()):
            if transport is not None:
                transport.abort()
        await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ addresses

    @property
    def channel_metadata_url(self) -> str:
        return f"{self.base_url}/botframework/v1/.well-known/openidconfiguration"

    @property
    def emulator_metadata_url(self) -> str:
        return f"{self.base_url}/common/v2.0/.well-known/openid-configuration"

    @property
    def login_url(self) -> str:
        """Authority for the bot's outbound token (``TO_CHANNEL_FROM_BOT_LOGIN_URL``)."""
        return f"{self.base_url}/{self.TENANT}"

    def bot_env(self) -> dict[str, str]:
        """Environment for an authenticated bot process that validates and obtains tokens here."""
        assert self.ca_file is not None
        return {
            "MicrosoftAppId": self.app_id,
            "MicrosoftAppPassword": self.app_password,
            "TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL": self.channel_metadata_url,
            "TO_BOT_FROM_CHANNEL_TOKEN_ISSUER": CHANNEL_ISSUER,
            "TO_BOT_FROM_EMULATOR_OPENID_METADATA_URL": self.emulator_metadata_url,
            "TO_CHANNEL_FROM_BOT_LOGIN_URL": self.login_url,
            # MSAL validates unknown authorities against login.microsoftonline.com unless told not to.
            "VALIDATE_AUTHORITY": "false",
            "REQUESTS_CA_BUNDLE": str(self.ca_file),
            # The RecordingConnector serves plain http on 127.0.0.1; authenticated mode trusts only
            # Microsoft's https hosts unless told otherwise (bot/service_urls.py).
            "TRUSTED_SERVICE_URLS": "http://127.0.0.1:*",
        }

    # ------------------------------------------------------------------ faults / observations

    def set_delays(self, *, metadata: float = 0.0, token: float = 0.0) -> None:
        with self._lock:
            self._metadata_delay, self._token_delay = metadata, token

    @property
    def metadata_hits(self) -> int:
        with self._lock:
            return self._metadata_hits

    def token_requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._token_requests)

    # ------------------------------------------------------------------ tokens

    def _jwk(self, endorsements: list[str] | None) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.signing_key.public_key()))
        jwk.update({"kid": self.signing_kid, "use": "sig", "alg": "RS256"})
        if endorsements is not None:
            jwk["endorsements"] = endorsements
        return jwk

    def sign(self, claims: dict[str, Any], *, key: rsa.RSAPrivateKey | None = None, kid: str | None = None,
             algorithm: str = "RS256") -> str:
        """A compact JWT over ``claims`` (default: the published key and its kid)."""
        return jwt.encode(claims, key or self.signing_key, algorithm=algorithm,
                          headers={"kid": kid or self.signing_kid})

    def channel_claims(self, service_url: str, *, audience: str | None = None, issuer: str = CHANNEL_ISSUER,
                       lifetime: float = 3600, starts_in: float = 0) -> dict[str, Any]:
        """Claims of a token the Bot Framework channel service sends (as in production)."""
        now = int(time.time())
        return {"serviceurl": service_url, "nbf": int(now + starts_in) - 5, "iat": now,
                "exp": int(now + starts_in + lifetime), "iss": issuer,
                "aud": self.app_id if audience is None else audience}

    def channel_token(self, service_url: str, **overrides: Any) -> str:
        """``Bearer`` header value for a valid channel token.

        ``overrides`` replace claims (``None`` drops one); ``lifetime``/``starts_in`` (seconds) shift
        the validity window; ``key``/``kid`` sign with another key or name another key id.
        """
        key = overrides.pop("key", None)
        kid = overrides.pop("kid", None)
        timing = {name: overrides.pop(name) for name in ("lifetime", "starts_in") if name in overrides}
        claims = {**self.channel_claims(service_url, **timing), **overrides}
        claims = {name: value for name, value in claims.items() if value is not None}
        return f"Bearer {self.sign(claims, key=key, kid=kid)}"

    def emulator_token(self, *, app_id: str | None = None, version: str = "1.0",
                       key: rsa.RSAPrivateKey | None = None) -> str:
        """``Bearer`` header value for an Emulator token (AAD, botframework.com tenant)."""
        now = int(time.time())
        app = self.app_id if app_id is None else app_id
        claims: dict[str, Any] = {"aud": self.app_id, "iat": now, "nbf": now - 5, "exp": now + 3600, "ver": version}
        if version == "1.0":
            claims.update({"iss": EMULATOR_ISSUER_V1, "appid": app})
        else:
            claims.update({"iss": EMULATOR_ISSUER_V2, "azp": app})
        return f"Bearer {self.sign(claims, key=key)}"

    # ------------------------------------------------------------------ handlers

    async def _metadata_delay_wait(self) -> None:
        with self._lock:
            self._metadata_hits += 1
            delay = self._metadata_delay
        await self._sleep(delay)  # stop() ends it at once

    async def _channel_metadata(self, request: web.Request) -> web.Response:
        await self._metadata_delay_wait()
        return web.json_response({
            "issuer": CHANNEL_ISSUER,
            "authorization_endpoint": "https://invalid.botframework.com",
            "jwks_uri": f"{self.base_url}/botframework/v1/keys",
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        })

    async def _channel_keys(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [self._jwk(self._endorsements)]})

    async def _emulator_metadata(self, request: web.Request) -> web.Response:
        await self._metadata_delay_wait()
        return web.json_response({
            "issuer": "https://login.microsoftonline.com/{tenantid}/v2.0",
            "jwks_uri": f"{self.base_url}/common/discovery/v2.0/keys",
            "id_token_signing_alg_values_supported": ["RS256"],
        })

    async def _emulator_keys(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [self._jwk(None)]})

    async def _tenant_metadata(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        base = f"{self.base_url}/{tenant}"
        return web.json_response({
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        })

    async def _token(self, request: web.Request) -> web.Response:
        with self._lock:
            delay = self._token_delay
        await self._sleep(delay)
        form = await request.post()
        tenant = request.match_info["tenant"]
        client_id = str(form.get("client_id", ""))
        scope = str(form.get("scope", ""))
        secret_ok = client_id == self.app_id and form.get("client_secret") == self.app_password
        ok = secret_ok and form.get("grant_type") == "client_credentials"
        token = f"outbound-{uuid.uuid4().hex}" if ok else None
        with self._lock:
            self._token_requests.append(TokenRequest(tenant, client_id, scope, secret_ok, 200 if ok else 401, token))
        if not ok:
            return web.json_response({"error": "invalid_client",
                                      "error_description": "AADSTS7000215: Invalid client secret provided."},
                                     status=401)
        return web.json_response({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                                  "access_token": token})
