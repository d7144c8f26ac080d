"""Unit tests of the edge's security settings and helpers (issue 13: findings 1, 5, 17, ops endpoints);
the running bot is tested in tests/e2e/test_edge_security.py."""

from __future__ import annotations

import io
import json
import logging

import pytest

from bot.request_body import json_depth_exceeds
from runtime import logs
from runtime.config import ConfigError, Settings

FORGED = "2026-01-01 00:00:00,000 CRITICAL app: FORGED admin login ok"


def render(fmt: str, message: str, *args: object, exc: BaseException | None = None) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.make_formatter(fmt))
    record = logging.LogRecord("bot.edge", logging.INFO, __file__, 1, message, args,
                               (type(exc), exc, exc.__traceback__) if exc else None)
    handler.emit(record)
    return stream.getvalue()


@pytest.mark.parametrize("hostile", [
    f"hello\n{FORGED}", f"hello\r\n{FORGED}", f"hello\r{FORGED}", f"x\u2028{FORGED}", f"x\u2029{FORGED}",
    f"x\x85{FORGED}", f"x\x0b{FORGED}", f"x\x0c{FORGED}",
])
def test_the_text_log_keeps_a_record_on_one_line(hostile: str) -> None:
    out = render("text", "turn committed in %s", hostile)
    assert out.endswith("\n") and out.count("\n") == 1, repr(out)
    assert len(out.rstrip("\n").splitlines()) == 1
    assert FORGED in out  # still readable, escaped on the record's own line
    assert out.split(" ", 3)[2:3] == ["INFO"]


def test_the_text_log_escapes_control_characters_and_ansi_sequences() -> None:
    out = render("text", "said %s", "a\nb\rc\td\x00e\x1b[31mred\x1b[0m\x7f\x9b\u202eevil\u2066")
    assert "said a\\nb\\rc\\td\\x00e\\x1b[31mred\\x1b[0m\\x7f\\x9b\\u202eevil\\u2066" in out
    assert not logs.CONTROL_CHARACTERS.search(out.rstrip("\n"))
    plain = render("text", "ordinary text: é, 漢字, emoji 🎉 and a backslash \\n")
    assert plain.rstrip("\n").endswith("ordinary text: é, 漢字, emoji 🎉 and a backslash \\n")


def test_a_traceback_cannot_pass_for_a_record() -> None:
    try:
        raise ValueError(f"bad id x\n{FORGED}")
    except ValueError as error:
        out = render("text", "failed", exc=error)
    first, *rest = out.rstrip("\n").split("\n")
    assert first.endswith("INFO bot.edge: failed")
    assert rest and all(line.startswith(logs.CONTINUATION) for line in rest), out
    assert any(FORGED in line for line in rest)


def test_json_logs_stay_one_object_per_line_and_escape_every_control_character() -> None:
    hostile = f"a\n{FORGED}\r\x1b[31m\x9b\u2028\u202e"
    out = render("json", "said %s", hostile)
    assert out.count("\n") == 1
    assert json.loads(out)["message"] == f"said {hostile}"
    assert not logs.CONTROL_CHARACTERS.search(out.rstrip("\n"))


# ------------------------------------------------------------------------------ HOST, authentication

def settings(**env: str) -> Settings:
    return Settings.from_env(env, dotenv=None)


def test_host_defaults_to_loopback_in_local_mode_and_everywhere_when_authenticated() -> None:
    assert settings().listen_host == "127.0.0.1"
    assert settings(MicrosoftAppId="app").listen_host == "0.0.0.0"
    assert settings(MicrosoftAppId="app", HOST="10.0.0.4").listen_host == "10.0.0.4"
    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert settings(HOST=loopback).listen_host == loopback
        assert settings(HOST=loopback).security_warnings == []


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "my-host"])
def test_local_mode_on_another_address_needs_the_opt_in(host: str) -> None:
    with pytest.raises(ConfigError, match=f"HOST={host} .*ALLOW_UNAUTHENTICATED_NETWORK=true"):
        settings(HOST=host)
    opted_in = settings(HOST=host, ALLOW_UNAUTHENTICATED_NETWORK="true")
    assert opted_in.listen_host == host
    assert any("ALLOW_UNAUTHENTICATED_NETWORK" in warning for warning in opted_in.security_warnings)


def test_require_authentication_refuses_local_mode_whatever_the_opt_in() -> None:
    for env in ({}, {"HOST": "127.0.0.1"}, {"HOST": "0.0.0.0", "ALLOW_UNAUTHENTICATED_NETWORK": "true"}):
        with pytest.raises(ConfigError, match="REQUIRE_AUTHENTICATION is set but MicrosoftAppId is not"):
            settings(REQUIRE_AUTHENTICATION="true", **env)
    assert settings(REQUIRE_AUTHENTICATION="true", MicrosoftAppId="app").require_authentication


def test_ops_and_limit_settings() -> None:
    default = settings()
    assert (default.ops_token, default.ops_port, default.ops_host) == ("", 0, "127.0.0.1")
    assert (default.body_read_timeout_seconds, default.max_json_depth, default.allow_emulator_tokens) == \
        (10.0, 64, False)
    assert settings(OPS_TOKEN="x" * 16, OPS_PORT="9100", OPS_HOST="0.0.0.0").ops_port == 9100
    for env, error in (({"OPS_TOKEN": "short"}, "OPS_TOKEN must be at least 16"),
                       ({"OPS_PORT": "70000"}, "OPS_PORT must be a TCP port"),
                       ({"OPS_PORT": "3978"}, "OPS_PORT must differ from PORT"),
                       ({"BODY_READ_TIMEOUT_SECONDS": "0"}, "BODY_READ_TIMEOUT_SECONDS must be more than 0"),
                       ({"MAX_JSON_DEPTH": "2"}, "MAX_JSON_DEPTH must be 8 or more"),
                       ({"ALLOW_EMULATOR_TOKENS": "maybe"}, "ALLOW_EMULATOR_TOKENS must be true or false")):
        with pytest.raises(ConfigError, match=error):
            settings(**env)
    open_ops = settings(MicrosoftAppId="app")
    assert any("/readyz and /metrics are open" in warning for warning in open_ops.security_warnings)
    assert not settings(MicrosoftAppId="app", OPS_TOKEN="x" * 16).security_warnings


def test_json_depth() -> None:
    def nest(depth: int) -> object:
        value: object = 1
        for n in range(depth):
            value = [value] if n % 2 else {"k": value}
        return value

    assert not json_depth_exceeds(nest(64), 64)
    assert json_depth_exceeds(nest(65), 64)
    assert not json_depth_exceeds({"a": 1, "b": [1, 2, {"c": "d"}]}, 3)
    assert json_depth_exceeds({"a": 1, "b": [1, 2, {"c": []}]}, 3)
    assert not json_depth_exceeds("scalar", 1)
    assert json_depth_exceeds(nest(5000), 64)  # no recursion
