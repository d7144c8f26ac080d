"""Refuse commits that carry secrets: run by pre-commit (.pre-commit-config.yaml) and `make lint`.

Looks for the credentials this bot handles (Bot Framework app passwords, OpenAI and Azure
OpenAI keys, Cosmos DB keys and connection strings, private keys) in the files given, or in
every file git tracks when none are given. A line may opt out with ``secret-scan: allow``
(for documented fake values such as the public Cosmos emulator key).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PATTERNS: dict[str, re.Pattern[str]] = {
    "private key": re.compile(r"-----BEGIN (?:RSA |EC |OPENSSH |)PRIVATE KEY-----"),
    "OpenAI API key": re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}"),
    "Cosmos DB / storage account key": re.compile(r"AccountKey=[A-Za-z0-9+/]{40,}={0,2}"),
    "assigned secret": re.compile(
        r"(?i)\b(MicrosoftAppPassword|AZURE_OPENAI_API_KEY|OPENAI_API_KEY|COSMOS_KEY|client_secret)\b"
        r"\s*[:=]\s*['\"]?(?!\$\{|<|\*|your|changeme|example)[A-Za-z0-9+/_~.\-]{16,}"),
}
ALLOW = "secret-scan: allow"
SKIP_SUFFIXES = {".png", ".jpg", ".zip", ".ico", ".lock"}


def scan(path: Path) -> list[str]:
    if path.suffix in SKIP_SUFFIXES or not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    findings = []
    for number, line in enumerate(text.splitlines(), 1):
        if ALLOW in line:
            continue
        findings += [f"{path}:{number}: looks like a {kind}"
                     for kind, pattern in PATTERNS.items() if pattern.search(line)]
    return findings


def tracked_files() -> list[Path]:
    output = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout
    return [Path(name) for name in output.splitlines()]


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or tracked_files()
    findings = [finding for path in files for finding in scan(path)]
    for finding in findings:
        print(finding, file=sys.stderr)
    if findings:
        print(f"{len(findings)} possible secret(s): remove them, or mark a fake value with '{ALLOW}'",
              file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
