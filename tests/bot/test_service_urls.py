"""TRUSTED_SERVICE_URLS (bot/service_urls.py): which Bot Connector URLs the bot ever talks to.

Pure policy tests: nothing here opens a connection.
"""

from __future__ import annotations

import pytest
from botbuilder.core import TurnContext
from botbuilder.core.adapters import TestAdapter
from botbuilder.schema import Activity

from bot.handler import TeamsBot
from bot.sender import ProactiveSender
from bot.service_urls import ServiceUrlPolicy
from harness.activities import message
from runtime.config import ConfigError, Settings
from runtime.protocol import DeliveryError
from storage.inbox import Inbox
from storage.memory import MemoryStore

MICROSOFT = ServiceUrlPolicy(["microsoft"])
LOOPBACK = ServiceUrlPolicy(["loopback"])

TRUSTED_IN_AUTHENTICATED_MODE = [
    "https://smba.trafficmanager.net/teams/",
    "https://smba.trafficmanager.net/amer/",
    "https://smba.trafficmanager.net:443/emea/",
    "https://smba.infra.gcc.teams.microsoft.com/teams",  # GCC
    "https://smba.infra.gov.teams.microsoft.us/teams",  # GCC High
    "https://smba.infra.dod.teams.microsoft.us/teams",  # DoD
    "https://webchat.botframework.com/",
    "https://europe.directline.botframework.com/",
    "https://directline.botframework.azure.us/",  # Azure Government
    "https://webchat.botframework.azure.cn/",  # Azure China
    "HTTPS://SMBA.TRAFFICMANAGER.NET/amer/",  # the same host: DNS names are case-insensitive
]

REFUSED_IN_AUTHENTICATED_MODE = [
    "http://smba.trafficmanager.net/teams/",  # https only
    "https://smba.trafficmanager.net.evil.example/",
    "https://evil.example/smba.trafficmanager.net/",
    "https://smba.trafficmanager.net@evil.example/",  # user info: the host is evil.example
    "https://user:pw@smba.trafficmanager.net/",  # user info on a trusted host: refused all the same
    "https://evil.example#@smba.trafficmanager.net/",
    "https://evil.example\\@smba.trafficmanager.net/",  # a backslash: parsers disagree about it
    "https://evil.example\\.botframework.com/",
    "https://smba.trafficmanager.net:8443/",  # another port than https's
    "https://smba.trafficmanager.net:99999/",  # no port at all
    "https://smba.trafficmanager.net:0x1bb/",
    "https://smba.trafficmanager.net./",  # a trailing dot is not the name Microsoft documents
    "https://ѕmba.trafficmanager.net/",  # Cyrillic ѕ (IDN look-alike)
    "https://ｓｍｂａ.trafficmanager.net/",  # fullwidth letters that IDNA would fold to ASCII
    "https://xn--mba-p5d.trafficmanager.net/",  # punycode of a look-alike
    "https://evil.trafficmanager.net/",  # any Azure customer can create a trafficmanager.net name
    "https://botframework.com/",  # *.botframework.com is the subdomains, not the domain
    "https://evilbotframework.com/",
    "https://webchat.botframework.com.evil.example/",
    "https://webchat.botframework.co/",
    "https://smba.trafficmanager.net\n.evil.example/",  # control characters
    "https://smba.trafficmanager.net /",
    "https://smba%2etrafficmanager.net/",  # percent-encoding in the host
    "https://smba.trafficmanager.net%2f@evil.example/",
    "https://[::1]/", "https://[smba.trafficmanager.net]/",
    "https://smba.infra.gcc.teams.microsoft.com.evil.example/",
    "https://127.0.0.1:3978/",
    "http://localhost:3978/",
    "ftp://smba.trafficmanager.net/",
    "smba.trafficmanager.net/teams/",
    "//smba.trafficmanager.net/teams/",
    "",
    None,
    42,
    "https://" + "a" * 3000 + ".botframework.com/",
]


@pytest.mark.parametrize("url", TRUSTED_IN_AUTHENTICATED_MODE)
def test_microsoft_hosts_over_https_are_trusted(url: str) -> None:
    assert MICROSOFT.refusal(url) is None


@pytest.mark.parametrize("url", REFUSED_IN_AUTHENTICATED_MODE)
def test_anything_else_is_refused_in_authenticated_mode(url: object) -> None:
    assert MICROSOFT.refusal(url) is not None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:3978/", "https://127.0.0.1/", "http://127.5.6.7:9/", "http://localhost:56000/_connector",
    "http://LOCALHOST:1/", "http://[::1]:8080/", "http://[0:0:0:0:0:0:0:1]:8080/",
])
def test_local_mode_trusts_loopback(url: str) -> None:
    assert LOOPBACK.refusal(url) is None


@pytest.mark.parametrize("url", [
    "https://smba.trafficmanager.net/teams/",  # local mode sends nowhere but this machine by default
    "http://localhost.evil.example/", "http://127.0.0.1.nip.io/", "http://2130706433/", "http://0.0.0.0:3978/",
    "http://10.0.0.1/", "http://169.254.169.254/latest/meta-data/", "http://[::2]/", "http://127.0.0.1@evil.example/",
    "http://evil.example@127.0.0.1/", "http://localhost./",
])
def test_local_mode_refuses_everything_else(url: str) -> None:
    assert LOOPBACK.refusal(url) is not None


def test_patterns_match_scheme_host_and_port() -> None:
    policy = ServiceUrlPolicy(["https://*.example.com", "http://127.0.0.1:*", "https://bots.example.org:8443",
                               "http://[::1]:3978"])
    assert policy.allows("https://a.example.com/") and policy.allows("https://a.b.example.com/x")
    assert not policy.allows("https://example.com/")
    assert not policy.allows("http://a.example.com/")
    assert not policy.allows("https://a.example.com:444/")
    assert policy.allows("http://127.0.0.1:1/") and policy.allows("http://127.0.0.1:65535/")
    assert not policy.allows("https://127.0.0.1:1/") and not policy.allows("http://127.0.0.2:1/")
    assert policy.allows("https://bots.example.org:8443/") and not policy.allows("https://bots.example.org/")
    assert policy.allows("http://[::1]:3978/") and not policy.allows("http://[::1]:3979/")
    assert not policy.allows("https://smba.trafficmanager.net/")  # the list replaces the default


def test_keywords_combine_with_patterns() -> None:
    policy = ServiceUrlPolicy(["Microsoft", "LOOPBACK", "https://bots.example.org"])
    assert policy.allows("https://smba.trafficmanager.net/teams/")
    assert policy.allows("http://localhost:3978/")
    assert policy.allows("https://bots.example.org/")


@pytest.mark.parametrize("pattern", [
    "smba.trafficmanager.net", "https://", "https://*", "https://*.com", "https://a.*.example.com",
    "https://smba.trafficmanager.net/teams/", "https://user@smba.trafficmanager.net", "ftp://example.com",
    "https://example.com:99999", "https://example.com:port", "https://[::zz]", "https://exämple.com", "anything",
])
def test_a_bad_pattern_is_a_configuration_error_naming_the_setting(pattern: str) -> None:
    with pytest.raises(ConfigError, match="TRUSTED_SERVICE_URLS"):
        ServiceUrlPolicy([pattern])


def test_the_default_depends_on_the_mode() -> None:
    local = ServiceUrlPolicy.from_settings(Settings.from_env({}, dotenv=None))
    authenticated = ServiceUrlPolicy.from_settings(Settings.from_env({"MicrosoftAppId": "app"}, dotenv=None))
    assert local.allows("http://127.0.0.1:3978/") and not local.allows("https://smba.trafficmanager.net/teams/")
    assert authenticated.allows("https://smba.trafficmanager.net/teams/")
    assert not authenticated.allows("http://127.0.0.1:3978/")
    overridden = ServiceUrlPolicy.from_settings(Settings.from_env(
        {"MicrosoftAppId": "app", "TRUSTED_SERVICE_URLS": " microsoft , http://127.0.0.1:* "}, dotenv=None))
    assert overridden.patterns == ("microsoft", "http://127.0.0.1:*")
    assert overridden.allows("http://127.0.0.1:3978/") and overridden.allows("https://smba.trafficmanager.net/")


def test_a_refusal_is_logged_once_with_the_setting_and_no_raw_control_characters(
        caplog: pytest.LogCaptureFixture) -> None:
    assert not LOOPBACK.check("http://evil.example/\nCRITICAL forged", where="edge", consequence="refused")
    [record] = [r for r in caplog.records if r.name == "bot.service_urls"]
    assert record.levelname == "WARNING"
    text = record.getMessage()
    assert "TRUSTED_SERVICE_URLS" in text and "refused" in text and "\n" not in text
    assert LOOPBACK.check("http://127.0.0.1:1/", where="edge", consequence="refused")


# ------------------------------------------------------------------ the handler and the sender (in-process)


class NoAdapter:
    """Stands in for the CloudAdapter: records every attempt to open a connection."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    async def continue_conversation(self, *args: object) -> None:
        self.calls.append(args)


@pytest.mark.parametrize("operation", ["send", "update", "typing"])
async def test_the_sender_never_connects_to_an_untrusted_stored_reference(operation: str) -> None:
    adapter = NoAdapter()
    sender = ProactiveSender(adapter, "app", service_urls=MICROSOFT)  # type: ignore[arg-type]
    reference = {"serviceUrl": "http://127.0.0.1:9/", "conversation": {"id": "c1"}, "channelId": "msteams"}
    if operation == "typing":
        await sender.typing(reference)  # best effort: skipped quietly
    else:
        with pytest.raises(DeliveryError) as caught:
            if operation == "send":
                await sender.send(reference, {"type": "message", "text": "hi"})
            else:
                await sender.update(reference, "activity-1", {"type": "message", "text": "hi"})
        assert caught.value.permanent
    assert adapter.calls == []


async def test_the_handler_never_stores_a_reference_naming_an_untrusted_url() -> None:
    store = MemoryStore()
    await store.open()
    bot = TeamsBot(store, Inbox(store, lambda key: None), commands=None, cancel_job=None,  # type: ignore[arg-type]
                   service_urls=LOOPBACK)
    activity = Activity().deserialize(message("hi", conversation_id="c1", service_url="https://evil.example/"))
    await bot.on_turn(TurnContext(TestAdapter(), activity))
    assert await store.get_reference("emulator:c1") is None
    assert not await store.has_event("emulator:c1", str(activity.id))
