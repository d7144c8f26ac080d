"""Drive the Microsoft 365 Agents Playground (npm ``@microsoft/m365agentsplayground``) headless.

The Playground is Microsoft's local Teams emulator: it posts real Teams-shaped activities
(``channelId`` ``msteams``, Teams ``channelData``, no Authorization header) to the bot and
serves a Bot Connector at ``http://localhost:PORT/_connector`` (the ``serviceUrl`` it puts in
every activity), where the bot's replies and proactive messages arrive.  Its web UI talks to
a small HTTP + WebSocket API, which this module uses directly, with no browser:

* ``GET  /_debug/ping`` -> ``pong``.
* ``GET  /_internal/v1/testConfig`` -> ``{"config": {...}, "internalConfig": {...}}``: tenant,
  ``bot`` (id, name), ``currentUser`` (``user-id-0``), ``users``, ``personalChat`` (a new GUID
  on every start), ``groupChats`` and ``teams[].channels`` (``team-id`` is the General channel).
  ``/_internal/v1/config`` answers the same but first waits (up to 15 s) for the bot endpoint.
* ``POST /_debug/conversation/{id}/installation`` with ``{}``: sends the bot an
  ``installationUpdate`` (add) and a ``conversationUpdate`` whose ``membersAdded`` is the user
  and the bot in the personal chat, only the bot in a group chat or channel.
* ``POST /_conversation/v1/conversations/{id}/messages`` with
  ``{"from": {"id": USER}, "text": ..., "textFormat": "plain", "mentions": [...]}`` ->
  ``{"messageId", "timestamp"}``, plus ``"postConversationId"`` (``CHANNEL;messageid=N``) when
  the message starts a new post in a channel.  The Playground forwards it to the bot only in
  the personal chat, or when ``mentions`` names the bot
  (``{"mentioned": {"id": BOT, "name": NAME}, "text": "<at>NAME</at>"}`` with the same
  ``<at>NAME</at>`` in the text; it becomes a ``mention`` entity).  Replies in a channel thread
  go to the post's conversation id.
* ``POST /_conversation/v1/submit`` with ``{"conversation": {"id"}, "from": {"id"},
  "replyToId": MESSAGE, "value": {...}}`` (an ``Action.Submit``): the bot gets a ``message``
  with ``value`` and ``replyToId`` and no text.  Answers 200 with no body.
* ``POST /_conversation/v1/invoke`` with ``{"name": "adaptiveCard/action", "value": {"action":
  {"type": "Action.Execute", "title", "verb", "data"}}, "from", "conversation", "replyToId"}``:
  an ``invoke`` to the bot; answers the bot's invoke response body ``{"type", "value"}`` (502 if
  the bot failed).  ``replyToId`` must be a message the Playground knows in that conversation.
* WebSocket ``/_ws_conversation/v1/conversations/stream``: what the bot sends, as JSON
  ``{"action": "createMessage" | "updateMessage" | "typing", "actionConversationId": ID,
  "message": {"messageId", "timestamp", "from": {"id"}, "text", "textFormat", "attachments",
  "attachmentLayout", "mentions", "suggestedActions", "postConversationId", ...}}`` (no
  ``message`` for ``typing``).  Proactive messages arrive exactly like replies.  A message the
  bot sends to a channel itself starts a new post: ``actionConversationId`` is the channel and
  ``message.postConversationId`` the new post.  Events sent while no client is connected are
  buffered and flushed to the next client that connects.

Start it against a running bot with :class:`Playground`; :func:`playground_available` says
why it cannot run (no ``node``, package not installed) so tests can skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

from harness.botproc import REPO_ROOT, http_request

__all__ = [
    "PACKAGE",
    "Chats",
    "Playground",
    "PlaygroundError",
    "Sent",
    "StreamEvent",
    "message_text",
    "node_modules_dir",
    "playground_available",
]

#: The npm package this module drives.
PACKAGE = "@microsoft/m365agentsplayground"

#: Message JSON as the Playground streams it (camelCase keys, see the module docstring).
Message = dict[str, Any]

_LISTENING = re.compile(rb"Listening on (\d+)")

#: WebSocket paths: what the bot sends, and the Playground's log panel (every exchange).
CONVERSATION_STREAM = "/_ws_conversation/v1/conversations/stream"
LOG_STREAM = "/_ws/log/stream"

#: Names the log panel uses for the two sides of an exchange.
_PLAYGROUND = "Microsoft 365 Agents Playground"
_APP = "User Application"


class PlaygroundError(RuntimeError):
    """The Playground did not start, or answered an API call with an error."""


def node_modules_dir() -> Path:
    """Where the package is installed: ``$PLAYGROUND_NODE_MODULES`` or the repo's ``node_modules``."""
    override = os.environ.get("PLAYGROUND_NODE_MODULES")
    return Path(override) if override else REPO_ROOT / "node_modules"


def _cli_path(node_modules: Path) -> Path:
    return node_modules / PACKAGE / "cli.js"


def playground_available(node_modules: str | os.PathLike[str] | None = None) -> str | None:
    """None when the Playground can be started, else the reason it cannot (for ``pytest.skip``)."""
    if shutil.which("node") is None:
        return "node is not on PATH (the Agents Playground is a Node.js program)"
    modules = Path(node_modules) if node_modules is not None else node_modules_dir()
    cli = _cli_path(modules)
    if not cli.is_file():
        return f"{PACKAGE} is not installed: {cli} is missing (npm install it, or set PLAYGROUND_NODE_MODULES)"
    return None


def playground_version(node_modules: str | os.PathLike[str] | None = None) -> str | None:
    """Installed package version, None if it is not installed."""
    modules = Path(node_modules) if node_modules is not None else node_modules_dir()
    try:
        data = json.loads((modules / PACKAGE / "package.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    version = data.get("version")
    return version if isinstance(version, str) else None


@dataclass(frozen=True)
class Chats:
    """Conversation ids of the Playground's built-in conversations (fresh for every start)."""

    personal: str
    group: str
    channel: str  # the team's General channel (same id as the team)
    team: str
    channels: tuple[str, ...]  # every channel of the team, General first


@dataclass(frozen=True)
class Sent:
    """What :meth:`Playground.send` got back.

    ``conversation_id`` is where the bot's reply shows up: the post that a channel message
    started (``CHANNEL;messageid=N``), else the conversation the message was sent to.
    """

    message_id: str
    conversation_id: str
    post_conversation_id: str | None
    timestamp: int | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class StreamEvent:
    """One JSON message from the conversation WebSocket, as received."""

    action: str  # createMessage, updateMessage, typing, ...
    conversation_id: str | None  # actionConversationId: where the UI shows it
    message: Message | None  # the bot's message (None for typing)
    raw: dict[str, Any]
    time: float = field(default_factory=time.monotonic)

    @property
    def post_conversation_id(self) -> str | None:
        """Set when a message the bot sent to a channel started a new post (thread)."""
        value = (self.message or {}).get("postConversationId")
        return value if isinstance(value, str) else None

    @property
    def conversation_ids(self) -> frozenset[str]:
        """Every conversation id the event belongs to (the UI's, the new post's, the bot's)."""
        ids = {self.conversation_id, self.post_conversation_id}
        if self.message is not None:
            ids.add(self.message.get("directLineConversationId"))
        return frozenset(i for i in ids if isinstance(i, str))

    def in_conversation(self, conversation_id: str | None) -> bool:
        """True for ``None`` (no filter) or when ``conversation_id`` is one of :attr:`conversation_ids`."""
        return conversation_id is None or conversation_id in self.conversation_ids

    @property
    def text(self) -> str | None:
        value = (self.message or {}).get("text")
        return value if isinstance(value, str) else None

    @property
    def message_id(self) -> str | None:
        value = (self.message or {}).get("messageId")
        return value if value is None else str(value)


class Playground:
    """The Agents Playground CLI as a subprocess, with a recording WebSocket listener.

    ``with Playground(bot.messages_url, log_dir=tmp_path) as pg:`` starts it on a free port
    (``-p 0``; the real port is read from its ``Listening on N`` line), waits until its API
    answers, connects the WebSocket listener (a background thread with its own event loop, so
    synchronous tests can block in :meth:`wait_for`), and kills it on exit.  Its stdout/stderr
    go to ``playground-N.out`` and its own log to ``playground-N.log`` in ``log_dir``.
    """

    def __init__(
        self,
        bot_endpoint: str,
        *,
        node_modules: str | os.PathLike[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        port: int = 0,
        channel_id: str = "msteams",
        config_file: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.bot_endpoint = bot_endpoint
        self.node_modules = Path(node_modules) if node_modules is not None else node_modules_dir()
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="playground-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._requested_port = port
        self.channel_id = channel_id
        self.config_file = Path(config_file) if config_file is not None else None
        self.extra_env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._out_path: Path | None = None
        self._log_path: Path | None = None
        self._config: dict[str, Any] | None = None
        # WebSocket listener state (shared with the listener thread, guarded by _lock).
        self._lock = threading.Lock()
        self._events: list[StreamEvent] = []
        self._ws_notes: list[str] = []  # connects, disconnects, bad frames: for failure messages
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._connected = threading.Event()
        self._log_connected = threading.Event()
        self._log_items: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ properties

    @property
    def port(self) -> int:
        if self._port is None:
            raise PlaygroundError("the Playground is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (the Playground listens on every interface)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def service_url(self) -> str:
        """The ``serviceUrl`` the Playground puts in activities: its mock Bot Connector."""
        return f"http://localhost:{self.port}/_connector"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_files(self) -> list[Path]:
        return [p for p in (self._out_path, self._log_path) if p is not None]

    # ------------------------------------------------------------------ lifecycle

    def _next_paths(self) -> tuple[Path, Path]:
        n = 1
        while (self.log_dir / f"playground-{n}.out").exists():
            n += 1
        return self.log_dir / f"playground-{n}.out", self.log_dir / f"playground-{n}.log"

    def _env(self, log_path: Path) -> dict[str, str]:
        env = os.environ.copy()
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1,localhost,::1"]))
        env.update(
            {
                "TEAMSAPPTESTER_BROWSER": "none",  # never open a browser
                "BOT_ENDPOINT": self.bot_endpoint,
                "M365_AGENTS_PLAYGROUND_LOGFILE": str(log_path),  # default: ./devTools/... in cwd
                "NO_PROXY": no_proxy,  # axios honours http_proxy: keep loopback traffic direct
                "no_proxy": no_proxy,
            }
        )
        if self.config_file is not None:
            env["M365_AGENTS_PLAYGROUND_CONFIG_PATH"] = str(self.config_file)
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> Self:
        """Launch the CLI, wait for its API and connect the WebSocket listener."""
        if self.alive:
            raise PlaygroundError(f"the Playground is already running (pid {self.pid})")
        reason = playground_available(self.node_modules)
        if reason is not None:
            raise PlaygroundError(reason)
        node = shutil.which("node")
        assert node is not None
        self._out_path, self._log_path = self._next_paths()
        args = [
            node,
            str(_cli_path(self.node_modules)),
            "--app-endpoint",
            self.bot_endpoint,
            "--channel-id",
            self.channel_id,
            "--disable-telemetry",
            "-p",
            str(self._requested_port),
        ]
        # cwd: a private directory, so no .m365agentsplayground.yml of the repo is picked up.
        workdir = self.log_dir / "cwd"
        workdir.mkdir(exist_ok=True)
        with open(self._out_path, "wb") as out:
            self._proc = subprocess.Popen(
                args,
                cwd=workdir,
                env=self._env(self._log_path),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so stop() can kill the whole process group
            )
        deadline = time.monotonic() + timeout
        try:
            self._port = self._wait_listening(deadline)
            self._wait_api(deadline)
            self._config = None
            self._start_listener(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _fail(self, what: str) -> PlaygroundError:
        return PlaygroundError(f"{what}\n{self.log_tail()}")

    def _wait_listening(self, deadline: float) -> int:
        assert self._proc is not None and self._out_path is not None
        while True:
            with contextlib.suppress(OSError):
                match = _LISTENING.search(self._out_path.read_bytes())
                if match:
                    return int(match.group(1))
            code = self._proc.poll()
            if code is not None:
                raise self._fail(f"the Playground exited with code {code} during startup")
            if time.monotonic() >= deadline:
                raise self._fail("the Playground did not print 'Listening on PORT' in time")
            time.sleep(0.05)

    def _wait_api(self, deadline: float) -> None:
        assert self._proc is not None
        while True:
            try:
                status, _ = http_request(f"{self.base_url}/_internal/v1/testConfig", timeout=2.0)
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            code = self._proc.poll()
            if code is not None:
                raise self._fail(f"the Playground exited with code {code} during startup")
            if time.monotonic() >= deadline:
                raise self._fail("the Playground API did not answer in time")
            time.sleep(0.05)

    def stop(self) -> int | None:
        """Disconnect the listener and kill the CLI (its whole process group); safe to call twice."""
        self._stop_listener()
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        code = proc.wait()
        self._port = None
        return code

    def __enter__(self) -> Self:
        if not self.alive:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the CLI's output and of its own log file."""
        out: list[str] = []
        for path in self.log_files:
            out.append(f"===== {path} =====")
            try:
                out.extend(path.read_text("utf-8", "replace").splitlines()[-lines:])
            except OSError as exc:
                out.append(f"<cannot read: {exc}>")
        return "\n".join(out)

    # ------------------------------------------------------------------ WebSocket listener

    def _start_listener(self, deadline: float) -> None:
        self._connected.clear()
        self._log_connected.clear()
        loop = asyncio.new_event_loop()
        self._loop = loop
        base = f"ws://127.0.0.1:{self.port}"
        streams = [
            (f"{base}{CONVERSATION_STREAM}", self._record, self._connected),
            (f"{base}{LOG_STREAM}", self._record_log, self._log_connected),
        ]

        self._stopping = asyncio.Event()  # created here so stop() can always reach it

        async def listen_all() -> None:
            async with aiohttp.ClientSession(trust_env=False) as session:
                await asyncio.gather(*(self._listen(session, *stream) for stream in streams))

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(listen_all())
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="PlaygroundStreams", daemon=True)
        self._thread.start()
        for url, _, connected in streams:
            if not connected.wait(max(0.1, deadline - time.monotonic())):
                raise self._fail(f"could not connect to {url}: {self._ws_notes[-3:]}")

    async def _listen(
        self,
        session: aiohttp.ClientSession,
        url: str,
        record: Callable[[str | bytes], None],
        connected: threading.Event,
    ) -> None:
        """Connect, record every frame, reconnect after a drop until stop() is called."""
        stopping = self._stopping
        assert stopping is not None
        while not stopping.is_set():
            try:
                async with session.ws_connect(url, heartbeat=20) as ws:
                    self._note(f"connected to {url}")
                    connected.set()
                    stop_task = asyncio.ensure_future(stopping.wait())
                    try:
                        while True:
                            receive = asyncio.ensure_future(ws.receive())
                            done, _ = await asyncio.wait({receive, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                            if receive not in done:
                                receive.cancel()
                                with contextlib.suppress(asyncio.CancelledError):
                                    await receive
                                return
                            msg = receive.result()
                            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                                record(msg.data)
                            else:
                                self._note(f"{url} closed ({msg.type.name}, {ws.close_code})")
                                break
                    finally:
                        stop_task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await stop_task
            except (aiohttp.ClientError, OSError) as exc:
                self._note(f"{url} error: {exc!r}")
            connected.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.2)

    def _note(self, text: str) -> None:
        with self._lock:
            self._ws_notes.append(text)

    def _record(self, data: str | bytes) -> None:
        try:
            frame = json.loads(data)
        except ValueError:
            self._note(f"non-JSON frame: {data!r:.200}")
            return
        if not isinstance(frame, dict):
            self._note(f"unexpected frame: {frame!r:.200}")
            return
        message = frame.get("message")
        conversation_id = frame.get("actionConversationId")
        event = StreamEvent(
            action=str(frame.get("action")),
            conversation_id=conversation_id if isinstance(conversation_id, str) else None,
            message=message if isinstance(message, dict) else None,
            raw=frame,
        )
        with self._lock:
            self._events.append(event)

    def _record_log(self, data: str | bytes) -> None:
        try:
            frame = json.loads(data)
        except ValueError:
            self._note(f"non-JSON log frame: {data!r:.200}")
            return
        item = frame.get("log") if isinstance(frame, dict) else None
        if isinstance(item, dict):
            with self._lock:
                self._log_items.append(item)

    def _stop_listener(self) -> None:
        loop, thread, stopping = self._loop, self._thread, self._stopping
        if loop is not None and thread is not None:
            if stopping is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # loop already finished
                    loop.call_soon_threadsafe(stopping.set)
            thread.join(timeout=10)
        self._loop = self._thread = self._stopping = None
        self._connected.clear()
        self._log_connected.clear()

    # ------------------------------------------------------------------ HTTP API

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        """Call the Playground API; returns ``(status, parsed JSON or text)`` and never raises on 4xx/5xx."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        status, text = http_request(
            f"{self.base_url}{path}", method=method, body=data, headers=headers, timeout=timeout
        )
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        status, answer = self.request(method, path, body, timeout)
        if not 200 <= status < 300:
            raise PlaygroundError(f"{method} {path} answered {status}: {answer!r}")
        return answer

    def config(self, refresh: bool = False) -> dict[str, Any]:
        """The Playground's ``config`` (tenant, bot, currentUser, users, chats, teams)."""
        if self._config is None or refresh:
            answer = self._call("GET", "/_internal/v1/testConfig")
            self._config = answer["config"]
        return self._config

    @property
    def user_id(self) -> str:
        """The signed-in user (``currentUser``), the default sender."""
        return str(self.config()["currentUser"]["id"])

    @property
    def bot_id(self) -> str:
        return str(self.config()["bot"]["id"])

    @property
    def bot_name(self) -> str:
        return str(self.config()["bot"]["name"])

    @property
    def chats(self) -> Chats:
        config = self.config()
        team = config["teams"][0]
        channels = tuple(str(c["id"]) for c in team["channels"])
        return Chats(
            personal=str(config["personalChat"]["id"]),
            group=str(config["groupChats"][0]["id"]),
            channel=channels[0],
            team=str(team["id"]),
            channels=channels,
        )

    def install(self, conversation_id: str) -> None:
        """Install the app in a conversation: ``installationUpdate`` + ``conversationUpdate`` to the bot."""
        self._call("POST", f"/_debug/conversation/{_quote(conversation_id)}/installation", {})

    def mention(self) -> tuple[str, dict[str, Any]]:
        """``("<at>NAME</at>", mention)`` for @mentioning the bot as the Playground's UI does."""
        at = f"<at>{self.bot_name}</at>"
        return at, {"mentioned": {"id": self.bot_id, "name": self.bot_name}, "text": at}

    def send(
        self,
        conversation_id: str,
        text: str,
        mention_bot: bool = False,
        *,
        user_id: str | None = None,
        mentions: list[dict[str, Any]] | None = None,
        text_format: str = "plain",
    ) -> Sent:
        """Post a user message (as the UI does); ``mention_bot`` prefixes ``<at>BOT</at>``.

        In group chats and channels the Playground forwards only messages that mention the bot.
        """
        all_mentions = list(mentions or [])
        if mention_bot:
            at, entity = self.mention()
            text = f"{at} {text}"
            all_mentions.insert(0, entity)
        body: dict[str, Any] = {"from": {"id": user_id or self.user_id}, "text": text, "textFormat": text_format}
        if all_mentions:
            body["mentions"] = all_mentions
        answer = self._call("POST", f"/_conversation/v1/conversations/{_quote(conversation_id)}/messages", body)
        post = answer.get("postConversationId")
        return Sent(
            message_id=str(answer.get("messageId")),
            conversation_id=post or conversation_id,
            post_conversation_id=post,
            timestamp=answer.get("timestamp"),
            raw=answer,
        )

    def submit(
        self,
        conversation_id: str,
        reply_to_id: str,
        value: dict[str, Any],
        *,
        user_id: str | None = None,
    ) -> None:
        """Press an ``Action.Submit`` on the card message ``reply_to_id``: the bot gets a
        ``message`` with ``value`` (the action's ``data`` merged with the inputs) and no text."""
        body = {
            "conversation": {"id": conversation_id},
            "from": {"id": user_id or self.user_id},
            "replyToId": reply_to_id,
            "value": value,
        }
        self._call("POST", "/_conversation/v1/submit", body)

    def execute(
        self,
        conversation_id: str,
        reply_to_id: str,
        verb: str,
        data: dict[str, Any] | None = None,
        *,
        title: str | None = None,
        user_id: str | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        """Press an ``Action.Execute``: an ``adaptiveCard/action`` invoke, answered synchronously.

        Returns ``(status, body)``: on 200 the body is the bot's invoke response ``{"type", "value"}``
        (a card type replaces the card in the UI); a failing bot gives 502.
        """
        action: dict[str, Any] = {"type": "Action.Execute", "verb": verb, "data": data or {}}
        if title is not None:
            action["title"] = title
        body = {
            "name": "adaptiveCard/action",
            "value": {"action": action},
            "from": {"id": user_id or self.user_id},
            "conversation": {"id": conversation_id},
            "replyToId": reply_to_id,
        }
        return self.request("POST", "/_conversation/v1/invoke", body, timeout=timeout)

    def custom_activity_template(self, conversation_id: str, type: str) -> dict[str, Any]:
        """A ready activity of ``type`` (install, uninstall, userAdded, botAdded, botRemoved, ...)."""
        query = urllib.parse.urlencode({"conversationId": conversation_id, "type": type})
        answer = self._call("GET", f"/_internal/v1/customActivities/template?{query}")
        assert isinstance(answer, dict)
        return answer

    def send_custom_activity(self, activity: dict[str, Any]) -> None:
        """Send any activity to the bot as is (fire and forget, like the UI's custom activity)."""
        self._call("POST", "/_internal/v1/customActivities", activity)

    # ------------------------------------------------------------------ recorded events

    def events(self, action: str | None = None, conversation_id: str | None = None) -> list[StreamEvent]:
        """Recorded WebSocket events, oldest first, optionally filtered (see :meth:`StreamEvent.in_conversation`)."""
        with self._lock:
            events = list(self._events)
        return [e for e in events if (action is None or e.action == action) and e.in_conversation(conversation_id)]

    def messages(self, conversation_id: str | None = None) -> list[Message]:
        """The bot's messages as the chat shows them: in creation order, later updates applied."""
        latest: dict[str, Message] = {}
        order: list[str] = []
        for event in self.events(conversation_id=conversation_id):
            if event.message is None or event.action not in ("createMessage", "updateMessage"):
                continue
            key = event.message_id or f"#{len(order)}"
            if key not in latest:
                order.append(key)
            latest[key] = event.message
        return [latest[k] for k in order]

    def texts(self, conversation_id: str | None = None, *, cards: bool = True) -> list[str]:
        """What each bot message says: its ``text``, else (``cards``) the text of its cards."""
        result = []
        for message in self.messages(conversation_id):
            text = message_text(message) if cards else message.get("text")
            if isinstance(text, str) and text:
                result.append(text)
        return result

    def clear(self) -> None:
        """Forget the recorded stream events and log items."""
        with self._lock:
            self._events.clear()
            self._log_items.clear()

    # ------------------------------------------------------------------ the log panel

    def log_items(self) -> list[dict[str, Any]]:
        """Items of the Playground's log panel (``/_ws/log/stream``), oldest first.

        Exchanges have ``type`` ``bot``, ``from``/``to`` (``Microsoft 365 Agents Playground``,
        ``User Application``), ``conversationId``, ``activityName``, ``request.body`` (the
        activity) and ``response`` (``statusCode``, ``body``); notes have ``type`` ``text``,
        ``level`` and ``displayText`` (e.g. warnings about cards it cannot render).
        """
        with self._lock:
            return list(self._log_items)

    def activities_to_bot(self, type: str | None = None, conversation_id: str | None = None) -> list[dict[str, Any]]:
        """The activities the Playground POSTed to the bot, as the log panel shows them."""
        result = []
        for item in self.log_items():
            if item.get("from") != _PLAYGROUND or item.get("to") != _APP:
                continue
            activity = (item.get("request") or {}).get("body")
            if not isinstance(activity, dict):
                continue
            if type is not None and activity.get("type") != type:
                continue
            if conversation_id is not None and (activity.get("conversation") or {}).get("id") != conversation_id:
                continue
            result.append(activity)
        return result

    def failed_exchanges(self) -> list[dict[str, Any]]:
        """Log items of exchanges (either direction) answered with HTTP >= 400, or with no answer."""
        failed = []
        for item in self.log_items():
            if "request" not in item:
                continue
            status = (item.get("response") or {}).get("statusCode")
            if not isinstance(status, int) or status >= 400:
                failed.append(item)
        return failed

    def log_notes(self, min_level: str = "warning") -> list[str]:
        """``displayText`` of the log panel's notes at ``min_level`` or above (warning, error)."""
        levels = ["info", "warning", "error"]
        floor = levels.index(min_level.lower())
        return [
            str(item.get("displayText"))
            for item in self.log_items()
            if "request" not in item
            and str(item.get("level", "info")).lower() in levels
            and levels.index(str(item.get("level", "info")).lower()) >= floor
        ]

    def _describe(self, conversation_id: str | None = None) -> str:
        with self._lock:
            actions = [f"{e.action}@{e.conversation_id}" for e in self._events[-20:]]
            notes = self._ws_notes[-3:]
        failed = [
            f"{i.get('from')} -> {i.get('to')}: {i.get('activityName')} {(i.get('response') or {}).get('statusCode')}"
            for i in self.failed_exchanges()[-5:]
        ]
        return (
            f"texts so far in {conversation_id!r}: {self.texts(conversation_id)!r}; "
            f"last events: {actions}; failed exchanges: {failed}; warnings: {self.log_notes()[-5:]}; "
            f"websocket: {notes}; playground alive: {self.alive}"
        )

    def wait_for(
        self,
        predicate: Callable[[Playground], bool],
        timeout: float = 10.0,
        interval: float = 0.05,
        conversation_id: str | None = None,
    ) -> None:
        """Block until ``predicate(self)`` holds; AssertionError (with what arrived) on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise AssertionError(f"condition not met within {timeout}s; {self._describe(conversation_id)}")
            time.sleep(interval)

    async def awaiting(
        self,
        predicate: Callable[[Playground], bool],
        timeout: float = 10.0,
        interval: float = 0.05,
        conversation_id: str | None = None,
    ) -> None:
        """Async :meth:`wait_for`, for tests running on an event loop."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise AssertionError(f"condition not met within {timeout}s; {self._describe(conversation_id)}")
            await asyncio.sleep(interval)

    def wait_for_messages(self, count: int, conversation_id: str | None = None, timeout: float = 10.0) -> list[Message]:
        """Wait for at least ``count`` bot messages (in ``conversation_id``) and return all of them."""
        try:
            self.wait_for(
                lambda pg: len(pg.messages(conversation_id)) >= count, timeout, conversation_id=conversation_id
            )
        except AssertionError as exc:
            raise AssertionError(f"expected >= {count} message(s) in {conversation_id!r}: {exc}") from None
        return self.messages(conversation_id)

    def wait_for_text(
        self,
        conversation_id: str | None,
        expected: str | Callable[[str], bool],
        timeout: float = 10.0,
    ) -> Message:
        """Wait for a bot message whose text equals ``expected`` (or satisfies it) and return it."""
        check = expected if callable(expected) else (lambda text: text == expected)

        def find() -> Message | None:
            for message in self.messages(conversation_id):
                text = message_text(message)
                if isinstance(text, str) and check(text):
                    return message
            return None

        try:
            self.wait_for(lambda _: find() is not None, timeout, conversation_id=conversation_id)
        except AssertionError as exc:
            raise AssertionError(f"no message matching {expected!r} in {conversation_id!r}: {exc}") from None
        found = find()
        assert found is not None
        return found


def message_text(message: Message) -> str:
    """A streamed message's ``text``; for a card-only message, the text its cards show.

    Hero/thumbnail cards give title, subtitle and text; Adaptive Cards their TextBlocks; button
    titles are left out.  Parts are joined with newlines.
    """
    text = message.get("text")
    if isinstance(text, str) and text:
        return text
    parts: list[str] = []
    for attachment in message.get("attachments") or []:
        content = attachment.get("content") if isinstance(attachment, dict) else None
        if isinstance(content, dict):
            _card_texts(content, parts)
    return "\n".join(parts)


def _card_texts(node: Any, parts: list[str]) -> None:
    if isinstance(node, dict):
        if node.get("type") == "TextBlock" and isinstance(node.get("text"), str):
            parts.append(node["text"])
        for key in ("title", "subtitle", "text"):
            if "type" not in node and isinstance(node.get(key), str):  # hero / thumbnail card
                parts.append(node[key])
        for key in ("body", "items", "columns"):
            _card_texts(node.get(key), parts)
    elif isinstance(node, list):
        for child in node:
            _card_texts(child, parts)


def _quote(conversation_id: str) -> str:
    """Conversation ids hold ';' and '=' in channel threads: keep them safe in a path."""
    return urllib.parse.quote(conversation_id, safe="")
