"""Bot Framework authentication at the edge: inbound token checks, outbound tokens, tenant allow-list.

Inbound (``POST /api/messages``)
    botbuilder validates the token, but as shipped an expired, malformed or wrongly signed token
    (and, with endpoint overrides, a missing header) escapes as a bare exception, i.e. HTTP 500.
    :class:`RequestAuthenticator` runs botbuilder's validation and turns every failure into
    :class:`AuthRejected` (401, with a log line that says what was wrong, never the token) or,
    when the signing keys cannot be fetched, :class:`AuthUnavailable` (503: the channel retries).
    botbuilder fetches the OpenID metadata with synchronous ``requests`` calls without a timeout
    (on the first request and once a day), so validation runs on a short-lived daemon thread
    with its own event loop and a deadline: the bot's loop never waits on the network.
    Before any of that, :meth:`RequestAuthenticator.check_header` refuses a header that cannot hold
    a token (none, not ``Bearer``, not three base64url segments) before the body is read, and tokens
    issued to the Bot Framework Emulator are refused unless ``ALLOW_EMULATOR_TOKENS``: they carry
    no ``serviceurl`` claim, so nothing ties such an activity to the Bot Connector it names.

Outbound (replies, proactive messages)
    botbuilder creates a new ``MicrosoftAppCredentials`` (and so a new MSAL app with an empty token
    cache) for every connector client, and MSAL is synchronous: every message sent would fetch a
    token from Entra ID on the event loop. :class:`CachingCredentialFactory` keeps one credentials
    object per (app id, scope, authority) and fetches its token on a worker thread before the
    connector's synchronous ``signed_session`` asks for it, which then hits MSAL's cache.

Tenants
    :class:`TenantPolicy` implements ``ALLOWED_TENANTS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import jwt
import requests
from botbuilder.core import InvokeResponse, TurnContext
from botbuilder.schema import Activity, ActivityTypes, CallerIdConstants
from botframework.connector.auth import (
    AppCredentials,
    AuthenticateRequestResult,
    AuthenticationConstants,
    BotFrameworkAuthentication,
    EmulatorValidation,
    MicrosoftAppCredentials,
    ServiceClientCredentialsFactory,
)
from msal import ConfidentialClientApplication
from msrest.authentication import Authentication

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long token validation may take (it may have to fetch the signing keys) before we answer 503.
AUTH_TIMEOUT_SECONDS = 20.0
#: Timeout of each HTTP call MSAL makes for the bot's outbound token (botbuilder sets none).
TOKEN_HTTP_TIMEOUT_SECONDS = 15.0
#: After a successful fetch, MSAL's cache surely holds a valid token for this long (Entra ID app
#: tokens live 60-90 minutes and MSAL renews them 5 minutes before they expire), so the next calls
#: skip the thread hop.
TOKEN_FRESH_SECONDS = 600.0

#: Public Azure values of the endpoint settings botbuilder reads from its configuration object.
PUBLIC_CLOUD_ENDPOINTS: dict[str, str] = {
    "TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL": AuthenticationConstants.TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL,
    "TO_BOT_FROM_CHANNEL_TOKEN_ISSUER": AuthenticationConstants.TO_BOT_FROM_CHANNEL_TOKEN_ISSUER,
    "TO_BOT_FROM_EMULATOR_OPENID_METADATA_URL": AuthenticationConstants.TO_BOT_FROM_EMULATOR_OPENID_METADATA_URL,
    # The prefix, as botbuilder's public-cloud default: the tenant comes from MicrosoftAppTenantId.
    "TO_CHANNEL_FROM_BOT_LOGIN_URL": AuthenticationConstants.TO_CHANNEL_FROM_BOT_LOGIN_URL_PREFIX,
    "TO_CHANNEL_FROM_BOT_OAUTH_SCOPE": AuthenticationConstants.TO_CHANNEL_FROM_BOT_OAUTH_SCOPE,
    "OAUTH_URL": AuthenticationConstants.OAUTH_URL,
    "CALLER_ID": CallerIdConstants.public_azure_channel.value,
}

REFUSAL_TEXT = "This bot is not available for your organization."


def endpoint_settings(overrides: dict[str, str]) -> dict[str, str]:
    """The endpoint settings to give ``ConfigurationBotFrameworkAuthentication``.

    With no override botbuilder's built-in public-cloud authentication is used as is (empty
    result). As soon as one is set, botbuilder switches to its "parameterized" authentication,
    which takes *every* endpoint from the configuration and has no defaults (a missing issuer
    rejects every token; a missing Emulator URL crashes on Emulator tokens), so the public-cloud
    value fills each one not overridden.
    """
    given = {name: value for name, value in overrides.items() if value}
    if not given:
        return {}
    return {**PUBLIC_CLOUD_ENDPOINTS, **given}


# ---------------------------------------------------------------------------------------- threads


async def run_off_loop(fn: Callable[[], T], *, timeout: float, name: str) -> T:
    """Run blocking ``fn`` on a new daemon thread and await its result for at most ``timeout`` s.

    A daemon thread rather than the default executor: the libraries involved make HTTP calls
    without timeouts, and a call that never returns must neither hold an executor slot forever
    nor keep the process from exiting.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await asyncio.wait_for(future, timeout)


# ---------------------------------------------------------------------------------------- inbound


class AuthRejected(Exception):
    """The request does not carry an acceptable Bot Framework token: answer 401."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AuthUnavailable(Exception):
    """The token could not be checked (signing keys unreachable): answer 503 so the channel retries."""


_CLAIM_NAMES = frozenset({"ver", "appid", "azp", "aud", "iss", "serviceurl", "kid", "alg"})


def _botbuilder_message(exc: BaseException) -> str:
    """botbuilder's message without the claim values some messages carry (after a colon, or quoted)."""
    first = str(exc.args[0]) if exc.args else type(exc).__name__
    first = first.split(":", 1)[0].strip().rstrip(".")
    first = re.sub(r"'([^']*)'", lambda m: m.group(0) if m.group(1) in _CLAIM_NAMES else "'…'", first)
    return first or type(exc).__name__


_PERMISSION_REASONS = (  # botbuilder's PermissionError messages -> what an operator should know
    ("invalid appid", "the token was issued for another app id than MicrosoftAppId (aud/appid claim)"),
    ("serviceurl", "the token's serviceurl claim does not match the activity's serviceUrl"),
    ("service_url", "the token's serviceurl claim does not match the activity's serviceUrl"),
    ("identity missing", "the token's issuer (iss) is not accepted"),
    ("no valid identity", "the token's issuer (iss) is not accepted"),
    ("invalid identity", "the token's issuer (iss) is not accepted"),
    ("'iss'", "the token's issuer (iss) is not accepted"),
    ("audience claim", "the token's issuer (iss) is not accepted"),
    ("claimsvalidator", "skill (bot-to-bot) tokens are not accepted by this bot"),
    ("skill claims", "skill (bot-to-bot) tokens are not accepted by this bot"),
)


def rejection_reason(exc: BaseException) -> str:
    """Why botbuilder refused a token, in words for the log; never includes the token or its claims."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "the token has expired (if every token fails like this, check this server's clock)"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "the token is not valid yet: nbf/iat in the future (if every token fails, check the clock)"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "the token's signature does not verify with the key published in the OpenID metadata"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "the token is signed with an algorithm that is not allowed"
    if isinstance(exc, jwt.DecodeError):
        return "the token is not a well-formed JWT"
    if isinstance(exc, jwt.PyJWTError):
        return f"the token is invalid ({type(exc).__name__})"
    if isinstance(exc, IndexError):  # botbuilder's key lookup: no published key has the token's kid
        return "the token's signing key (kid) is not among the keys published in the OpenID metadata"
    if isinstance(exc, KeyError):
        return f"the token lacks the {_clip(_botbuilder_message(exc), 40)} claim"
    if isinstance(exc, PermissionError):
        message = _botbuilder_message(exc)
        lowered = message.lower()
        for needle, reason in _PERMISSION_REASONS:
            if needle in lowered:
                return reason
        return f"the token was refused: {_clip(message)}"  # may hold a claim value: quoted, clipped
    lowered = str(exc).lower()
    if "endorsement" in lowered:
        return "the signing key is not endorsed for the activity's channel"
    if "algorithm" in lowered:
        return "the token is signed with an algorithm that is not allowed"
    return f"the token could not be validated ({type(exc).__name__})"


def _clip(value: object, limit: int = 120) -> str:
    """A request-supplied value made safe for one log line."""
    return repr(str(value)[:limit]) if value is not None else "None"


#: A compact JWS: three base64url segments (the signature may be empty: ``alg: none``, refused later
#: with its own reason).
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def _header_problem(authorization: str | None) -> str | None:
    """What makes this ``Authorization`` header unable to carry a Bot Framework token (None: nothing)."""
    header = (authorization or "").strip()
    if not header:
        return ("no Authorization header, and MicrosoftAppId is set: every request must carry a Bot Framework "
                "token (is something other than Azure Bot Service calling?)")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme != "Bearer" or not token or " " in token:
        return "the Authorization header is not of the form 'Bearer <token>'"
    if not _JWT_SHAPE.fullmatch(token):
        return "the token is not a well-formed JWT (three base64url segments)"
    return None


def issued_to_the_emulator(token: str) -> bool:
    """Whether the token's issuer is one botbuilder routes to its Emulator validation (the AAD tenants
    the Emulator gets its tokens from). Such tokens carry no ``serviceurl`` claim, so they do not tie
    an activity to the Bot Connector it names. Read without verifying: only used to refuse."""
    try:
        issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except Exception:
        return False  # botbuilder's validation says what is wrong with it
    return issuer in EmulatorValidation.TO_BOT_FROM_EMULATOR_TOKEN_VALIDATION_PARAMETERS.issuer


class RequestAuthenticator:
    """Authenticates one incoming activity; see the module docstring."""

    def __init__(self, auth: BotFrameworkAuthentication, *, auth_disabled: bool,
                 timeout: float = AUTH_TIMEOUT_SECONDS, allow_emulator_tokens: bool = False) -> None:
        self._auth = auth
        self._auth_disabled = auth_disabled
        self._timeout = timeout
        self._allow_emulator_tokens = allow_emulator_tokens

    @property
    def auth_disabled(self) -> bool:
        return self._auth_disabled

    def check_header(self, authorization: str | None, remote: str | None) -> None:
        """Refuse, before the body is even read, a request whose ``Authorization`` header cannot hold
        a valid token (authenticated mode): unauthenticated callers must not cost JSON parsing."""
        if self._auth_disabled:
            return  # local mode: a token is refused after parsing, with a message saying why
        reason = _header_problem(authorization)
        if reason is not None:
            log.warning("401 for a request from %s, before reading its body: %s", _clip(remote, 60), reason)
            raise AuthRejected(reason)

    async def authenticate(self, activity: Activity, authorization: str | None) -> AuthenticateRequestResult:
        where = f"channel={_clip(activity.channel_id)} serviceUrl={_clip(activity.service_url)}"
        try:
            return await self._authenticate(activity, authorization)
        except AuthRejected as exc:
            log.warning("401 for a %s activity (%s): %s", _clip(activity.type, 40), where, exc.reason)
            raise
        except AuthUnavailable as exc:
            log.error("503 for a %s activity (%s): %s", _clip(activity.type, 40), where, exc)
            raise

    async def _authenticate(self, activity: Activity, authorization: str | None) -> AuthenticateRequestResult:
        header = (authorization or "").strip()
        if self._auth_disabled:
            if header:
                # botbuilder would try to validate it against an empty app id: it can never pass.
                raise AuthRejected("this bot runs in local mode (no MicrosoftAppId) and cannot accept a Bot "
                                   "Framework token; set MicrosoftAppId/MicrosoftAppPassword, or send no "
                                   "Authorization header (Emulator/Agents Playground without credentials)")
            return await self._auth.authenticate_request(activity, None)  # anonymous: no I/O
        if (reason := _header_problem(header)) is not None:
            raise AuthRejected(reason)
        token = header.partition(" ")[2].strip()
        if not self._allow_emulator_tokens and issued_to_the_emulator(token):
            raise AuthRejected("the token was issued to the Bot Framework Emulator, which this bot does not accept "
                               "in authenticated mode (to test a registered bot in the Emulator, set "
                               "ALLOW_EMULATOR_TOKENS=true)")
        header = f"Bearer {token}"

        def validate() -> AuthenticateRequestResult:
            return asyncio.run(self._auth.authenticate_request(activity, header))

        try:
            return await run_off_loop(validate, timeout=self._timeout, name="bf-token-validation")
        except TimeoutError:
            raise AuthUnavailable(f"validating the token took over {self._timeout:g} s (fetching the OpenID "
                                  "metadata / signing keys?)") from None
        except requests.RequestException as exc:
            raise AuthUnavailable(f"cannot fetch the OpenID metadata or signing keys: {type(exc).__name__}: "
                                  f"{str(exc)[:300]}") from None
        except KeyError as exc:
            if exc.args and exc.args[0] in ("jwks_uri", "keys"):
                raise AuthUnavailable(f"the OpenID metadata has no {exc.args[0]!r}: check the metadata URL "
                                      "settings") from None
            raise AuthRejected(rejection_reason(exc)) from None
        except Exception as exc:  # everything else botbuilder raises means "not authenticated"
            raise AuthRejected(rejection_reason(exc)) from None


# ---------------------------------------------------------------------------------------- outbound


class OutboundTokenError(RuntimeError):
    """No token for the Bot Connector could be obtained; retrying later may help.

    Not an OSError on purpose: raised inside a turn (an inline reply) it must reach on_turn_error as
    a bot-side failure, not be mistaken by the edge for a store outage.
    """


#: Set by the edge while botbuilder prepares an incoming turn (before the bot's logic runs); see
#: :meth:`CachingCredentialFactory.create_credentials`. A mutable holder, cleared when the turn
#: starts, so tasks the turn spawns (which copy the context) do not inherit it.
_PREPARING_INGEST: ContextVar[list[bool] | None] = ContextVar("bf_preparing_ingest", default=None)


@contextlib.contextmanager
def preparing_ingest() -> Iterator[Callable[[], None]]:
    """``with preparing_ingest() as turn_started:`` around ``process_activity``; call ``turn_started()``
    first thing in the turn's logic."""
    holder = [True]
    token = _PREPARING_INGEST.set(holder)

    def turn_started() -> None:
        holder[0] = False

    try:
        yield turn_started
    finally:
        holder[0] = False
        _PREPARING_INGEST.reset(token)


class _TokenState:
    """Book-keeping for one cached credentials object."""

    def __init__(self, credentials: AppCredentials) -> None:
        self.credentials = credentials
        self.fetch: Callable[[bool], str] = credentials.get_access_token  # botbuilder's synchronous call
        self.fresh_until = 0.0  # monotonic time until which MSAL surely holds a valid token
        self.failure: str | None = None  # why the last fetch failed (None: it did not)
        self.inflight: asyncio.Task[None] | None = None
        self.attempted = False  # a fetch has completed (either way)


class CachingCredentialFactory(ServiceClientCredentialsFactory):
    """Wraps botbuilder's credentials factory: one credentials object (and so one MSAL token cache)
    per (app id, scope, authority), whose token is fetched off the event loop.

    botbuilder awaits ``create_credentials`` right before it builds a connector client; the client
    later calls the credentials' *synchronous* ``get_access_token`` from ``signed_session``. Fetching
    the token here on a thread leaves only an MSAL cache hit for that call. While the last fetch
    failed, the synchronous call fails fast with :class:`OutboundTokenError` instead of retrying the
    network on the loop; the next ``create_credentials`` tries again.

    Ingest hardly waits for Entra ID: while botbuilder prepares an incoming turn (see
    :func:`preparing_ingest`) a renewal runs in the background, so a 2xx for a stored message does
    not depend on the token service; only the very first fetch after start-up is awaited there (so
    an inline reply finds a token). Sends (``continue_conversation``) always wait for it.

    Also honours ``VALIDATE_AUTHORITY=false`` for a custom login URL (botbuilder passes it along but
    never hands it to MSAL) and gives MSAL's HTTP calls a timeout (botbuilder sets none).
    """

    def __init__(self, inner: ServiceClientCredentialsFactory, *,
                 timeout: float = TOKEN_HTTP_TIMEOUT_SECONDS * 2, fresh_for: float = TOKEN_FRESH_SECONDS) -> None:
        self._inner = inner
        self._timeout = timeout
        self._fresh_for = fresh_for
        self._cache: dict[tuple[str, str, str, bool], Authentication] = {}
        self._states: dict[int, _TokenState] = {}

    async def is_valid_app_id(self, app_id: str) -> bool:
        return bool(await self._inner.is_valid_app_id(app_id))

    async def is_authentication_disabled(self) -> bool:
        return bool(await self._inner.is_authentication_disabled())

    async def create_credentials(self, app_id: str, oauth_scope: str, login_endpoint: str,
                                 validate_authority: bool) -> Authentication:
        key = (app_id or "", oauth_scope or "", login_endpoint or "", bool(validate_authority))
        credentials = self._cache.get(key)
        if credentials is None:
            created = await self._inner.create_credentials(app_id, oauth_scope, login_endpoint, validate_authority)
            credentials = self._cache.setdefault(key, created)
            if isinstance(credentials, AppCredentials) and credentials.microsoft_app_id:
                self._states[id(credentials)] = self._guard(credentials)
        state = self._states.get(id(credentials))
        if state is None or time.monotonic() < state.fresh_until:
            return credentials  # no token needed (local mode) or MSAL's cache surely has one
        if state.inflight is None or state.inflight.done():
            state.inflight = asyncio.ensure_future(self._prefetch(state))
        preparing = _PREPARING_INGEST.get()
        if preparing is not None and preparing[0] and state.attempted:
            return credentials  # ingest: renew in the background (a first fetch is awaited, for inline replies)
        await asyncio.shield(state.inflight)
        return credentials

    @staticmethod
    def _guard(credentials: AppCredentials) -> _TokenState:
        """Make the synchronous token call fail fast while the last off-loop fetch failed."""
        state = _TokenState(credentials)

        def get_access_token(force_refresh: bool = False) -> str:
            if state.failure is not None:
                raise OutboundTokenError(f"no token for the Bot Connector: {state.failure}")
            return state.fetch(force_refresh)

        credentials.get_access_token = get_access_token  # type: ignore[method-assign]
        return state

    async def _prefetch(self, state: _TokenState) -> None:
        credentials = state.credentials

        def work() -> None:
            if isinstance(credentials, MicrosoftAppCredentials) and credentials.app is None:
                credentials.app = ConfidentialClientApplication(
                    client_id=credentials.microsoft_app_id,
                    client_credential=credentials.microsoft_app_password,
                    authority=credentials.oauth_endpoint,
                    validate_authority=bool(getattr(credentials, "validate_authority", True)),
                    timeout=TOKEN_HTTP_TIMEOUT_SECONDS,
                )
            state.fetch(False)

        started = time.monotonic()
        try:
            await run_off_loop(work, timeout=self._timeout, name="bf-outbound-token")
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc)[:300]}" if str(exc) else type(exc).__name__
            if state.failure != why:
                log.warning("cannot get a token for the Bot Connector from %s (app id %s): %s",
                            getattr(credentials, "oauth_endpoint", "?"), credentials.microsoft_app_id, why)
            state.failure, state.fresh_until, state.attempted = why, 0.0, True
        else:
            if state.failure is not None:
                log.info("got a token for the Bot Connector again")
            state.failure, state.fresh_until, state.attempted = None, started + self._fresh_for, True


# ---------------------------------------------------------------------------------------- tenants


def activity_tenants(activity: Activity) -> set[str]:
    """Tenant ids an activity names (Teams: channelData.tenant.id and conversation.tenantId), lower-case."""
    found: set[str] = set()
    channel_data = activity.channel_data
    tenant = channel_data.get("tenant") if isinstance(channel_data, dict) else getattr(channel_data, "tenant", None)
    tenant_id = tenant.get("id") if isinstance(tenant, dict) else getattr(tenant, "id", None)
    if isinstance(tenant_id, str) and tenant_id.strip():
        found.add(tenant_id.strip().lower())
    # botbuilder maps the wire name "tenantID" to tenant_id; Teams sends "tenantId", which lands in
    # additional_properties.
    conversation = activity.conversation
    extra = getattr(conversation, "additional_properties", None) or {}
    for value in (getattr(conversation, "tenant_id", None), extra.get("tenantId"), extra.get("tenantID")):
        if isinstance(value, str) and value.strip():
            found.add(value.strip().lower())
    return found


class TenantPolicy:
    """``ALLOWED_TENANTS``: empty allows everyone; otherwise every tenant id an activity names must be
    listed, and an activity naming none (Emulator, Web Chat) is refused too."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self._allowed = frozenset(t.strip().lower() for t in allowed if t and t.strip())

    @property
    def enabled(self) -> bool:
        return bool(self._allowed)

    def allows(self, activity: Activity) -> bool:
        if not self._allowed:
            return True
        tenants = activity_tenants(activity)
        return bool(tenants) and tenants <= self._allowed

    async def refuse(self, turn_context: TurnContext) -> None:
        """Answer an activity from another tenant politely; stores nothing."""
        activity = turn_context.activity
        log.info("refused a %s activity from tenant(s) %s: not in ALLOWED_TENANTS", _clip(activity.type, 40),
                 sorted(activity_tenants(activity)) or "none")
        if activity.type == ActivityTypes.message:
            await turn_context.send_activity(REFUSAL_TEXT)
        elif activity.type == ActivityTypes.invoke:
            await turn_context.send_activity(Activity(
                type=ActivityTypes.invoke_response,
                value=InvokeResponse(status=403, body={"error": REFUSAL_TEXT}),
            ))
