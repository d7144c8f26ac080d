"""The edge under attack (issue 13): exposure (finding 1), hostile bodies (5), forged log lines and
ids (17), and who may read /readyz and /metrics. Every test starts the real app process; every
request goes to loopback. Emulator tokens (3) and the early 401 (4) are in test_auth.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.activities import message, new_conversation_id
from harness.botproc import REPO_ROOT, BotProcess, BotStartError, free_port, http_request, log_text, wait_for_log
from harness.connector import RecordingConnector
from harness.openid import OpenIdServer

pytestmark = pytest.mark.e2e

Start = Callable[[dict[str, str]], BotProcess]


@pytest.fixture
def start(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Start]:
    """Start a bot (one SQLite process) with ``env``; each is killed after the test, its log shown if it failed."""
    started: list[BotProcess] = []

    def launch(env: dict[str, str]) -> BotProcess:
        bot = BotProcess(tmp_path / f"bot-{len(started)}", env={"ACTIVATE_LINE_SECONDS": "2", **env})
        started.append(bot)
        return bot.start()

    yield launch
    report = getattr(request.node, "rep_call", None)
    for bot in started:
        if report is not None and report.failed:
            print(bot.log_tail(200))
        bot.kill()


def refused_start(tmp_path: Path, env: dict[str, str]) -> tuple[int | None, str]:
    """Start a bot that must not start: its exit status and what it printed."""
    bot = BotProcess(tmp_path / f"refused-{len(list(tmp_path.glob('refused-*')))}", env=env)
    with pytest.raises(BotStartError):
        bot.start(timeout=30)
    return bot.returncode, bot.log_tail()




def stored_rows(bot: BotProcess, needle: str) -> int:
    """Rows of the bot's SQLite store whose key contains ``needle``."""
    path = bot.data_dir / "conversations.sqlite3"
    db = sqlite3.connect(path)
    try:
        return sum(db.execute(f"SELECT count(*) FROM {table} WHERE instr(key, ?) > 0", (needle,)).fetchone()[0]
                   for table in ("events", "conversation_references", "conversations", "jobs", "items"))
    finally:
        db.close()


# ------------------------------------------------------------------------------ finding 1: exposure


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on ``port`` (Linux /proc/net/tcp, tcp6)."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


#: /proc/net/tcp spells addresses as little-endian hex words.
IPV4_LOOPBACK, IPV4_ANY = "0100007F", "00000000"
IPV6_LOOPBACK = "00000000000000000000000001000000"


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_local_mode_listens_on_loopback_only_by_default(start: Start) -> None:
    """`make run` with no configuration: the Emulator and the Playground on 127.0.0.1 reach it, nobody
    else can (on today's main it listened on 0.0.0.0 without authentication)."""
    bot = start({"MicrosoftAppId": "", "HOST": ""})
    addresses = listening_addresses(bot.port)
    assert addresses and addresses <= {IPV4_LOOPBACK, IPV6_LOOPBACK}, addresses
    assert bot.get("/healthz")[0] == 200
    assert "(host 127.0.0.1)" in wait_for_log(bot, "ready on port")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "bot.example.com"])
def test_local_mode_on_a_network_address_is_refused_at_start_up(tmp_path: Path, host: str) -> None:
    status, output = refused_start(tmp_path, {"MicrosoftAppId": "", "HOST": host})
    assert status == 2, output
    errors = [line for line in output.splitlines() if line.startswith("configuration error:")]
    assert len(errors) == 1, output
    assert f"HOST={host}" in errors[0] and "ALLOW_UNAUTHENTICATED_NETWORK=true" in errors[0]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_the_explicit_opt_in_listens_everywhere_and_warns_at_every_start(start: Start) -> None:
    bot = start({"MicrosoftAppId": "", "HOST": "0.0.0.0", "ALLOW_UNAUTHENTICATED_NETWORK": "true"})
    assert IPV4_ANY in listening_addresses(bot.port)
    warning = "WARNING app: local mode (no MicrosoftAppId) listening on HOST=0.0.0.0"
    assert log_text(bot).count(warning) == 1  # logged before the app starts serving
    bot.restart()
    assert log_text(bot).count(warning) == 2  # and again at the next start


def dockerfile_env() -> dict[str, str]:
    """The ENV lines of the Dockerfile (``KEY=VALUE`` pairs, backslash continuations)."""
    text = (REPO_ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    env: dict[str, str] = {}
    for line in joined.splitlines():
        if line.strip().startswith("ENV "):
            for pair in line.strip()[4:].split():
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def test_the_docker_image_never_runs_unauthenticated(tmp_path: Path, start: Start) -> None:
    image = dockerfile_env()
    assert image.get("HOST") == "0.0.0.0" and image.get("REQUIRE_AUTHENTICATION") == "true", image
    # The image's settings, but this test's port and data directory (the image's are /data and 3978).
    image = {name: value for name, value in image.items() if name not in ("PORT", "DATA_DIR")}
    for extra in ({}, {"ALLOW_UNAUTHENTICATED_NETWORK": "true"}, {"HOST": "127.0.0.1"}):
        status, output = refused_start(tmp_path, {**image, "MicrosoftAppId": "", "MicrosoftAppPassword": "",
                                                  **extra})
        assert status == 2, output
        assert "configuration error: REQUIRE_AUTHENTICATION is set but MicrosoftAppId is not" in output
    # With credentials the image's settings start (authenticated, on every interface).
    with OpenIdServer(tmp_path / "idp", app_id="00000000-0000-0000-0000-0000000d0c4e",
                      app_password="test-secret-not-real") as idp:
        bot = start({**image, **idp.bot_env()})
        assert bot.get("/healthz")[0] == 200


# ------------------------------------------------------------------------------ finding 5: bodies


def test_a_deeply_nested_body_is_400_not_500(start: Start, conn: RecordingConnector) -> None:
    bot = start({})
    depth_100k = b'{"type": "message", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body = bot.post_activity({}, raw_body=depth_100k)  # RecursionError: a 500 on today's main
    assert status == 400, body
    assert json.loads(body) == {"error": "the body is nested too deeply",
                                "details": ["arrays and objects may nest at most 64 levels deep (MAX_JSON_DEPTH)"]}
    conv = new_conversation_id("deep")
    activity = message("hello", conversation_id=conv, service_url=conn.url)
    nested: object = "bottom"
    for _ in range(70):  # parsable, but deeper than the limit
        nested = {"a": nested}
    status, body = bot.post_activity({**activity, "channelData": nested})
    assert status == 400 and "nested too deeply" in body, body
    nested = "bottom"
    for _ in range(60):  # within the limit: an ordinary message
        nested = [nested]
    status, body = bot.post_activity({**activity, "channelData": {"deep": nested}})
    assert status == 201, body
    assert conn.wait_for_texts(1, conv, timeout=15)
    status, metrics = bot.get("/metrics")
    assert re.search(r'^teams_agent_activities_rejected_total\{status="400"\} [2-9]', metrics, re.M), metrics


def test_a_body_that_trickles_in_is_cut_off_with_408(start: Start) -> None:
    """One byte at a time, never finishing: the bot answers 408 once BODY_READ_TIMEOUT_SECONDS is up
    (on today's main it waited for ever). No timing is asserted: only that the answer comes while
    the body is still incomplete, and what it says."""
    bot = start({"BODY_READ_TIMEOUT_SECONDS": "1"})
    head = (f"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1:{bot.port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 5000\r\n\r\n")
    received = b""
    with socket.create_connection(("127.0.0.1", bot.port), timeout=30) as sock:
        sock.sendall(head.encode())
        sock.settimeout(0.2)
        for _ in range(300):  # 300 bytes of 5000, at most ~60 s: the body is never complete
            with contextlib.suppress(OSError):  # the bot may close the connection after answering
                sock.sendall(b" ")
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            received += chunk
            if not chunk or b"}" in received:
                break
    status_line, _, rest = received.decode("latin-1").partition("\r\n")
    assert status_line.startswith("HTTP/1.1 408 "), f"no 408 for a trickling body: {received[:300]!r}"
    payload = json.loads(rest.partition("\r\n\r\n")[2])
    assert payload == {"error": "request timeout",
                       "details": ["the body did not arrive within 1 s (BODY_READ_TIMEOUT_SECONDS)"]}
    assert bot.get("/healthz")[0] == 200


# ------------------------------------------------------------------------------ finding 17: forged log lines

FORGED = "2026-01-01 00:00:00,000 CRITICAL app: FORGED admin login ok"


def test_control_characters_neither_forge_log_lines_nor_pass_in_ids(start: Start, conn: RecordingConnector) -> None:
    """On today's main a newline in a conversation id became a line of its own in the text log
    (``... CRITICAL app: FORGED``) and made every send of that conversation fail and retry."""
    bot = start({"LOG_FORMAT": "text"})
    conv = new_conversation_id("forge")
    status, body = bot.post_activity(message("hello", conversation_id=f"{conv}\n{FORGED}", service_url=conn.url))
    assert status == 400, body
    assert "'conversation.id' must not contain control characters" in body
    for field, value in (("id", f"a\r\n{FORGED}"), ("channelId", "emulator\x1b[2K"), ("replyToId", "x\x00y"),
                         ("from", {"id": f"user\n{FORGED}", "name": "Ada"}),
                         ("recipient", {"id": "bot\u2028x", "name": "Bot"})):
        status, body = bot.post_activity({**message("hello", conversation_id=conv, service_url=conn.url),
                                          field: value})
        assert status == 400, (field, body)
        assert "must not contain control characters" in body, (field, body)
    # User text with a newline and an ANSI sequence is a message like any other.
    status, body = bot.post_activity(message(f"hello\n{FORGED}\x1b[31m", conversation_id=conv, service_url=conn.url))
    assert status == 201, body
    assert conn.wait_for_texts(1, conv, timeout=15)

    text = wait_for_log(bot, "400 for an activity in conversation")
    lines = text.splitlines()
    assert not [line for line in lines if line.startswith(FORGED[:23]) or line.startswith("CRITICAL")], \
        "a log line was forged"
    rejected = next(line for line in lines if "400 for an activity in conversation" in line)
    assert f"{conv}\\n{FORGED}" in rejected  # escaped, on the line of the record that carries it
    assert "\x1b" not in text
    assert stored_rows(bot, f"{conv}\n") == 0


# ------------------------------------------------------------------------------ /readyz and /metrics


def get(url: str, token: str | None = None) -> int:
    return http_request(url, headers={"Authorization": f"Bearer {token}"} if token else None, timeout=10)[0]


def test_ops_endpoints_behind_a_token(start: Start) -> None:
    token = "ops-token-0123456789abcdef"
    bot = start({"OPS_TOKEN": token})
    for path in ("/readyz", "/metrics"):
        assert get(bot.base_url + path) == 401
        assert get(bot.base_url + path, "wrong-token-0123456789") == 401
        assert get(bot.base_url + path, token) == 200
    assert get(bot.base_url + "/healthz") == 200  # liveness (the Docker HEALTHCHECK) stays open


def test_ops_endpoints_on_a_port_of_their_own(start: Start) -> None:
    ops_port = free_port()
    token = "ops-token-0123456789abcdef"
    bot = start({"OPS_PORT": str(ops_port), "OPS_TOKEN": token})
    ops = f"http://127.0.0.1:{ops_port}"
    for path in ("/readyz", "/metrics"):
        assert get(bot.base_url + path, token) == 404  # not on the main port any more
        assert get(ops + path) == 401
        assert get(ops + path, token) == 200
    assert get(bot.base_url + "/healthz") == 200
    assert get(ops + "/healthz") == 200
    if Path("/proc/net/tcp").exists():
        assert listening_addresses(ops_port) == {IPV4_LOOPBACK}  # OPS_HOST defaults to loopback


def test_ops_endpoints_stay_open_on_the_main_port_by_default(start: Start) -> None:
    bot = start({})
    assert get(bot.base_url + "/readyz") == 200
    assert get(bot.base_url + "/metrics") == 200
