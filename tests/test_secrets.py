"""Secrets stay out of git and out of the logs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.activities import message, new_conversation_id
from harness.botproc import BotProcess
from harness.connector import RecordingConnector

REPO = Path(__file__).resolve().parents[1]
SCANNER = [sys.executable, str(REPO / "scripts" / "check_secrets.py")]


def test_env_files_are_ignored_by_git() -> None:
    result = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert result.returncode == 0


def test_the_repository_has_no_secrets() -> None:
    result = subprocess.run(SCANNER, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("line", [
    "MicrosoftAppPassword=Abc8Q~verysecretvalue1234567890",  # secret-scan: allow
    'OPENAI_API_KEY = "sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCD"',  # secret-scan: allow
    "COSMOS_KEY: 'C2y6yDjf5R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DF2nQ9nDuVTqobD4b8mGGyPMbIZ=='",  # secret-scan: allow
    "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=" + "A" * 86 + "==",
    "-----BEGIN RSA PRIVATE KEY-----",  # secret-scan: allow
])
def test_the_scanner_catches_secrets(tmp_path: Path, line: str) -> None:
    leaked = tmp_path / "settings.env"
    leaked.write_text(f"# config\n{line}\n")
    result = subprocess.run([*SCANNER, str(leaked)], capture_output=True, text=True)
    assert result.returncode == 1 and "settings.env:2" in result.stderr


def test_placeholders_and_allowed_lines_pass(tmp_path: Path) -> None:
    ok = tmp_path / "README.md"
    ok.write_text("MicrosoftAppPassword=<your secret>\nOPENAI_API_KEY=${OPENAI_API_KEY}\n"
                  "COSMOS_KEY=C2y6yDjf5R+ob0N8A7Cgv30VRDJIWEHLM  # secret-scan: allow\n")
    assert subprocess.run([*SCANNER, str(ok)], capture_output=True).returncode == 0


@pytest.mark.e2e
def test_no_secret_reaches_the_logs(tmp_path: Path) -> None:
    secrets = {"OPENAI_API_KEY": "sk-SENTINELopenai0123456789abcdefghijkl",  # secret-scan: allow
               "AZURE_OPENAI_API_KEY": "SENTINELazure0123456789abcdef"}
    from harness.fake_openai import FakeOpenAI

    with FakeOpenAI() as model, RecordingConnector() as conn:
        model.require_auth("authorization", "Bearer another-key")  # refused: the failure path logs too
        bot = BotProcess(tmp_path, env={**secrets, "OPENAI_BASE_URL": model.openai_base_url, "LOG_LEVEL": "DEBUG"})
        with bot:
            conv = new_conversation_id()
            bot.post_activity(message("hello", conversation_id=conv, service_url=conn.url))
            conn.wait_for_texts(1, conv, timeout=30)
            logs = bot.log_tail(100_000)
    assert "credentials" in conn.texts(conv)[0]
    for name, value in secrets.items():
        assert value not in logs, f"{name} leaked into the log"
        assert value[-12:] not in logs, f"part of {name} leaked into the log"
