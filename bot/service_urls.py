"""Which Bot Connector service URLs the bot talks to: ``TRUSTED_SERVICE_URLS``.

Every reply, typing indicator and card update goes to the ``serviceUrl`` of an activity, or of
the conversation reference stored from the last one; in authenticated mode the request carries
the bot's own bearer token. botbuilder does not restrict that URL: ``AppCredentials.trust_service_url``
and ``is_trusted_service`` are no-ops ("not a required part of the security model") and the token
is attached to every connector request; the channel token's ``serviceurl`` claim is compared
with the activity, but Emulator tokens carry none, and local mode checks no token at all. Without
a check, one activity naming another URL would redirect the conversation's replies, job results
and the token there (an open relay and SSRF).

So the bot trusts only the service URLs this policy allows, at three places: the edge refuses an
activity naming another one (403, nothing stored or sent), the handler never stores a reference
naming one, and the sender never connects to one (a reference stored before, or written by
whoever can write the store).

Patterns (``TRUSTED_SERVICE_URLS``, comma-separated): ``scheme://host[:port]`` where host may start
with ``*.`` (any subdomain, not the domain itself) and port may be ``*`` (any port; without a
port, only the scheme's default); or the keywords ``microsoft`` (:data:`MICROSOFT_SERVICE_URLS`)
and ``loopback`` (http or https on 127.0.0.0/8, localhost or [::1], any port). Unset: ``microsoft``
in authenticated mode, ``loopback`` in local mode (Emulator, Agents Playground).

A service URL is compared by scheme, host and port only, after refusing whatever could be read
differently by another URL parser: user info (``https://smba.trafficmanager.net@evil.example``),
backslashes, non-ASCII (IDN look-alikes), control characters, a trailing dot, odd ports.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3.util

from runtime import metrics
from runtime.config import ConfigError, Settings

log = logging.getLogger(__name__)

SETTING = "TRUSTED_SERVICE_URLS"

#: The Bot Framework / Teams Bot Connector hosts Microsoft documents: Teams public cloud, GCC, GCC High
#: and DoD (TeamsProactiveServiceEndpoints in the Microsoft 365 Agents SDK), the other Bot Framework
#: channels (webchat, directline and their regional hosts), Azure Government and Azure China.
#: Not ``*.trafficmanager.net``: any Azure customer can create a name there.
MICROSOFT_SERVICE_URLS = (
    "https://smba.trafficmanager.net",
    "https://smba.infra.gcc.teams.microsoft.com",
    "https://smba.infra.gov.teams.microsoft.us",
    "https://smba.infra.dod.teams.microsoft.us",
    "https://*.botframework.com",
    "https://*.botframework.azure.us",
    "https://*.botframework.azure.cn",
)

DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PATTERN_NETLOC = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|(?:\*\.)?[a-z0-9.-]+)(?::(?P<port>\*|[0-9]{1,5}))?")
_MAX_URL_LENGTH = 2048


@dataclass(frozen=True)
class Endpoint:
    """What a service URL connects to: scheme, lower-case host (IPv6 without brackets), port."""

    scheme: str
    host: str
    port: int


def endpoint(url: object) -> Endpoint | str:
    """The endpoint ``url`` names, or why it cannot be trusted whatever the patterns say."""
    if not isinstance(url, str) or not url:
        return "no service URL"
    if len(url) > _MAX_URL_LENGTH:
        return f"longer than {_MAX_URL_LENGTH} characters"
    if not url.isascii() or not url.isprintable() or " " in url:
        return "it contains spaces, control or non-ASCII characters (use the punycode xn-- form of a host name)"
    if "\\" in url:
        return "it contains a backslash"
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a bracketed host that is no IP address
        return "it is not a well-formed URL"
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return "not an http(s) URL"
    if "@" in parts.netloc:
        return "it carries user info (user@host)"
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        return "its port is not a number from 1 to 65535"
    host = _normal_host(parts.hostname or "", bracketed=parts.netloc.startswith("["))
    if host is None:
        return "its host is not a plain host name or IP address"
    try:  # what requests/urllib3 will connect to must be what we checked
        other = urllib3.util.parse_url(url)
    except ValueError:
        return "the HTTP client cannot parse it"
    other_host = (other.host or "").lower()
    bracketed = other_host.startswith("[") and other_host.endswith("]")
    if _normal_host(other_host[1:-1] if bracketed else other_host, bracketed=bracketed) != host \
            or (other.port or DEFAULT_PORTS[scheme]) != port:
        return "the HTTP client reads another host or port in it"
    return Endpoint(scheme, host, port)


def is_http_url(url: object) -> bool:
    """An http(s) URL with a host at all (whether it is trusted is :meth:`ServiceUrlPolicy.refusal`'s question)."""
    if not isinstance(url, str):
        return False
    try:  # urlsplit raises on some hosts, e.g. "http://[x]/"
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in DEFAULT_PORTS and bool(parts.netloc)


def _normal_host(host: str, *, bracketed: bool) -> str | None:
    """A host name or IP address in one spelling (lower case; IPv6 compressed); None if it is neither."""
    host = host.lower()
    if bracketed:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
    return host if _HOST_NAME.fullmatch(host) else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Pattern:
    """One trusted ``scheme://host[:port]``; ``host`` is ``.example.com`` for ``*.example.com``,
    ``port`` None for any port, ``loopback`` for the loopback keyword (either scheme, any port)."""

    text: str
    scheme: str = ""
    host: str = ""
    port: int | None = None
    loopback: bool = False

    def matches(self, target: Endpoint) -> bool:
        if self.loopback:
            return is_loopback(target.host)
        if target.scheme != self.scheme or (self.port is not None and target.port != self.port):
            return False
        if self.host.startswith("."):
            return target.host.endswith(self.host) and len(target.host) > len(self.host)
        return target.host == self.host


def parse_pattern(text: str) -> list[Pattern]:
    """One ``TRUSTED_SERVICE_URLS`` entry as patterns; ConfigError saying what is wrong."""
    raw = text.strip()
    lowered = raw.lower()
    if lowered == "loopback":
        return [Pattern("loopback", loopback=True)]
    if lowered == "microsoft":
        return [pattern for entry in MICROSOFT_SERVICE_URLS for pattern in parse_pattern(entry)]
    problem = f"{SETTING}: {raw!r} is not 'microsoft', 'loopback' or scheme://host[:port] " \
              "(host may start with '*.', port may be '*')"
    scheme, separator, rest = lowered.partition("://")
    if not separator or scheme not in DEFAULT_PORTS or not raw.isascii():
        raise ConfigError(problem)
    netloc, _, path = rest.partition("/")
    if path not in ("", "*") or not netloc or "@" in netloc:
        raise ConfigError(f"{problem}; a pattern names no path, no user info")
    found = _PATTERN_NETLOC.fullmatch(netloc)
    if found is None:
        raise ConfigError(problem)
    host, port_text = found["host"], found["port"]
    if host.startswith("["):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ConfigError(f"{problem}; {host} is not an IPv6 address") from None
    else:
        name = host.removeprefix("*.")
        if not _HOST_NAME.fullmatch(name):
            raise ConfigError(problem)
        if host.startswith("*.") and "." not in name:
            raise ConfigError(f"{SETTING}: {raw!r} would trust every host under a top-level domain")
        host = "." + name if host.startswith("*.") else name
    port: int | None = None
    if port_text is None:
        port = DEFAULT_PORTS[scheme]
    elif port_text != "*":
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ConfigError(f"{problem}; the port must be 1 to 65535")
    return [Pattern(raw, scheme, host, port)]


class ServiceUrlPolicy:
    """The service URLs the bot trusts (see the module docstring)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(p.strip() for p in patterns if p.strip())
        if not self.patterns:
            raise ConfigError(f"{SETTING}: no pattern given")
        self._rules = [rule for text in self.patterns for rule in parse_pattern(text)]

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceUrlPolicy:
        """TRUSTED_SERVICE_URLS, or the mode's default: ``microsoft`` (authenticated), ``loopback`` (local)."""
        default = ("loopback",) if settings.local_mode else ("microsoft",)
        policy = cls(settings.trusted_service_urls or default)
        if settings.trusted_service_urls:
            log.info("replies go only to service URLs matching %s=%s", SETTING, policy.description)
            if not settings.local_mode and policy.allows_plain_http:
                log.warning("%s lets the bot send its Bot Framework token over plain http (%s): for tests only",
                            SETTING, policy.description)
        return policy

    @property
    def allows_plain_http(self) -> bool:
        return any(rule.loopback or rule.scheme == "http" for rule in self._rules)

    @property
    def description(self) -> str:
        return ",".join(self.patterns)

    def refusal(self, url: object) -> str | None:
        """Why ``url`` is not trusted, in words; None when it is."""
        target = endpoint(url)
        if isinstance(target, str):
            return target
        if any(rule.matches(target) for rule in self._rules):
            return None
        return "it matches no trusted pattern"

    def allows(self, url: object) -> bool:
        return self.refusal(url) is None

    def check(self, url: object, *, where: str, consequence: str) -> bool:
        """True when ``url`` is trusted; otherwise log one warning an operator can act on, count it
        (``where``: edge, store or send) and return False."""
        reason = self.refusal(url)
        if reason is None:
            return True
        metrics.UNTRUSTED_SERVICE_URLS.labels(where).inc()
        shown = repr(url[:200]) if isinstance(url, str) else type(url).__name__
        log.warning("untrusted serviceUrl %s (%s): %s. If it is a genuine Bot Connector, add it to %s "
                    "(now %r)", shown, reason, consequence, SETTING, self.description)
        return False
