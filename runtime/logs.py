"""Log output: text for people (``LOG_FORMAT=text``, the default) or one JSON object per line
(``LOG_FORMAT=json``, for log collectors), each record tagged with the conversation and job it
is about.

The tags come from context variables: the conversation processor sets ``conversation_key`` in
each conversation's task, the job runner sets ``conversation_key`` and ``job_id`` while a job
runs. asyncio copies the context into every task it creates, so lines logged by anything those
tasks call (stores, the sender, tools) carry the ids too. In JSON they are fields of their own;
the text format leaves them out (its messages already name what they are about).

Log lines cannot be forged: messages carry text from users, channels and tools (a conversation id,
a tool's error), so the text format escapes control characters in them (``\\n``, ``\\x1b`` ...: a
newline cannot start a fake record, an ANSI sequence cannot recolour or erase the terminal) and
indents the lines of a traceback under ``  | ``. JSON output escapes them too (one object per line).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Characters that must not reach a log line raw: C0 controls (newline, CR, ESC ...), DEL, C1 controls,
#: Unicode line/paragraph separators and the bidirectional overrides (which reorder what a reader sees).
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: What JSON output still carries raw after json.dumps(ensure_ascii=False): C0 controls are escaped by it.
_JSON_UNESCAPED = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: Prefix of every line of a traceback in the text format, so none of them can pass for a record.
CONTINUATION = "  | "


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_control_characters(text: str) -> str:
    """``text`` on one line, control characters written as escapes (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return CONTROL_CHARACTERS.sub(_escape, text)


_conversation_key: ContextVar[str | None] = ContextVar("log_conversation_key", default=None)
_job_id: ContextVar[str | None] = ContextVar("log_job_id", default=None)

Tokens = tuple[Token[str | None], Token[str | None]]

#: Attributes every LogRecord has; anything else on a record came from ``extra=`` (or a filter).
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def set_context(*, conversation_key: str | None = None, job_id: str | None = None) -> Tokens:
    """Tag the current context's log records with these ids; an id not given is cleared, so a task
    started from a job's context (a conversation woken by a finished job) does not carry its job id."""
    return _conversation_key.set(conversation_key), _job_id.set(job_id)


def reset_context(tokens: Tokens) -> None:
    """Undo :func:`set_context` (for code that runs inside a caller's task)."""
    conversation_token, job_token = tokens
    _job_id.reset(job_token)
    _conversation_key.reset(conversation_token)


def current_context() -> dict[str, str]:
    """The ids set in this context, by field name."""
    found = {"conversation_key": _conversation_key.get(), "job_id": _job_id.get()}
    return {name: value for name, value in found.items() if value is not None}


class ContextFilter(logging.Filter):
    """Adds ``conversation_key`` / ``job_id`` attributes to records when set in the context
    (an explicit ``extra={"job_id": ...}`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current_context().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ISO 8601), level, logger, message,
    then the context ids and any ``extra`` fields, then ``exception`` / ``stack`` text if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and not name.startswith("_") and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _JSON_UNESCAPED.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(entry, ensure_ascii=False,
                                                                                  default=str))


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, one record per line whatever the message holds (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        record.message = escape_control_characters(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def formatException(self, ei: Any) -> str:
        return self._indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return self._indent(super().formatStack(stack_info))

    @staticmethod
    def _indent(text: str) -> str:
        return "\n".join(CONTINUATION + escape_control_characters(line) for line in text.split("\n"))


def make_formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def setup(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``fmt``; replaces the root logger's handlers.

    Python warnings are logged too (logger ``py.warnings``), so JSON output stays one object per line.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler
