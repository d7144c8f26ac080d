"""Teams app manifest template, icons and scripts/package_manifest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MANIFEST_DIR = ROOT / "manifest"
SCRIPT = ROOT / "scripts" / "package_manifest.py"
BOT_ID = "0b6f2a4e-3c1d-4e5f-9a8b-7c6d5e4f3a2b"
SCOPES = {"personal", "team", "groupChat"}
COMMANDS = {"help", "jobs", "cancel", "reset"}
# The official schemas ship in the npm package @microsoft/app-manifest (checked
# with 1.1.2, which has teams/v1.0 ... v1.30) at
#   build/json-schemas/teams/v<manifestVersion>/MicrosoftTeams.schema.json
APP_MANIFEST_PKG = ROOT / "node_modules" / "@microsoft" / "app-manifest"


def load_template() -> dict:
    return json.loads((MANIFEST_DIR / "manifest.template.json").read_text(encoding="utf-8"))


def package(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the packaging script with a clean environment (no MicrosoftAppId/BOT_DOMAIN)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("MicrosoftAppId", "BOT_DOMAIN", "PRIVACY_URL", "TERMS_URL")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "appPackage.zip"), *args],
        env={**base, **(env or {})}, capture_output=True, text=True, timeout=60,
    )


def built_manifest(tmp_path: Path) -> dict:
    with zipfile.ZipFile(tmp_path / "appPackage.zip") as zf:
        return json.loads(zf.read("manifest.json"))


def test_template_is_valid_json_with_placeholders() -> None:
    manifest = load_template()
    assert manifest["$schema"].endswith(f"/v{manifest['manifestVersion']}/MicrosoftTeams.schema.json")
    assert manifest["id"] == "${{BOT_ID}}"
    assert manifest["bots"][0]["botId"] == "${{BOT_ID}}"
    assert len(manifest["name"]["short"]) <= 30 and len(manifest["description"]["short"]) <= 80


def test_bot_scopes_and_commands() -> None:
    (bot,) = load_template()["bots"]
    assert set(bot["scopes"]) == SCOPES
    assert bot["supportsFiles"] is False and bot["isNotificationOnly"] is False
    covered = {scope for cl in bot["commandLists"] for scope in cl["scopes"]}
    assert covered == SCOPES
    for command_list in bot["commandLists"]:
        titles = [c["title"] for c in command_list["commands"] if c.get("type", "basic") == "basic"]
        assert sorted(titles) == sorted(COMMANDS), command_list["scopes"]


def test_prompt_starters_in_one_on_one_chats_say_what_the_bot_is_good_at() -> None:
    """Prompt starters (issue 15): commands of type prompt, personal scope only, each with its prompt;
    the offline model understands every one of them."""
    (bot,) = load_template()["bots"]
    prompts = [(cl["scopes"], c) for cl in bot["commandLists"] for c in cl["commands"] if c.get("type") == "prompt"]
    assert len(prompts) >= 3
    assert all(scopes == ["personal"] for scopes, _ in prompts)
    assert all(c["prompt"].strip() and len(c["title"]) <= 128 for _, c in prompts)
    assert "explain durability" in {c["prompt"] for _, c in prompts}


def test_icons() -> None:
    with Image.open(MANIFEST_DIR / "color.png") as color:
        assert color.size == (192, 192)
        extrema: Any = color.getextrema()
        assert color.mode == "RGB" or extrema[3][0] == 255  # opaque
    with Image.open(MANIFEST_DIR / "outline.png") as outline:
        assert outline.size == (32, 32)
        rgba = outline.convert("RGBA")
        rgba_extrema: Any = rgba.getextrema()
        alpha_min, alpha_max = rgba_extrema[3]
        assert alpha_min == 0 and alpha_max == 255  # has transparency and a visible glyph
        pixels: list[Any] = list(rgba.get_flattened_data())
        visible = [p[:3] for p in pixels if p[3]]
        assert set(visible) == {(255, 255, 255)}  # white only


def test_package_with_bot_id(tmp_path: Path) -> None:
    result = package(tmp_path, env={"MicrosoftAppId": BOT_ID, "BOT_DOMAIN": "bot.example.com"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "appPackage.zip")
    with zipfile.ZipFile(tmp_path / "appPackage.zip") as zf:
        assert sorted(zf.namelist()) == ["color.png", "manifest.json", "outline.png"]
        text = zf.read("manifest.json").decode("utf-8")
    assert "${{" not in text
    manifest = json.loads(text)
    assert manifest["id"] == manifest["bots"][0]["botId"] == BOT_ID
    assert manifest["validDomains"] == ["bot.example.com"]


def test_package_bot_id_argument_and_no_domain(tmp_path: Path) -> None:
    result = package(tmp_path, "--bot-id", BOT_ID)
    assert result.returncode == 0, result.stderr
    manifest = built_manifest(tmp_path)
    assert manifest["id"] == BOT_ID
    assert "validDomains" not in manifest


def test_privacy_and_terms_links_name_files_in_the_repository() -> None:
    developer = load_template()["developer"]
    for key, name in (("privacyUrl", "PRIVACY.md"), ("termsOfUseUrl", "TERMS.md")):
        url = developer[key]
        assert url.startswith(developer["websiteUrl"] + "/blob/main/"), url
        path = url.removeprefix(developer["websiteUrl"] + "/blob/main/")
        assert path == name and (ROOT / path).is_file(), f"{key} points at {path}, which is not in the repository"


def test_package_privacy_and_terms_urls_can_be_set(tmp_path: Path) -> None:
    env = {"PRIVACY_URL": "https://bot.example.com/privacy"}
    result = package(tmp_path, "--bot-id", BOT_ID, "--terms-url", "https://bot.example.com/terms", env=env)
    assert result.returncode == 0, result.stderr
    developer = built_manifest(tmp_path)["developer"]
    assert (developer["privacyUrl"], developer["termsOfUseUrl"]) == (env["PRIVACY_URL"], "https://bot.example.com/terms")
    assert package(tmp_path, "--bot-id", BOT_ID, "--terms-url", "http://x.example").returncode == 1


def test_package_without_bot_domain_says_how_to_set_it(tmp_path: Path) -> None:
    result = package(tmp_path, "--bot-id", BOT_ID)
    assert result.returncode == 0, result.stderr
    assert "BOT_DOMAIN" in result.stderr and "--bot-domain" in result.stderr
    assert "BOT_DOMAIN" not in package(tmp_path, "--bot-id", BOT_ID, "--bot-domain", "bot.example.com").stderr


def test_package_without_bot_id_exits_2(tmp_path: Path) -> None:
    result = package(tmp_path)
    assert result.returncode == 2
    assert "MicrosoftAppId" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "appPackage.zip").exists()


def test_package_rejects_non_guid(tmp_path: Path) -> None:
    result = package(tmp_path, "--bot-id", "not-a-guid")
    assert result.returncode != 0 and "GUID" in result.stderr


def test_manifest_matches_official_schema(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    version = load_template()["manifestVersion"]
    schema_path = APP_MANIFEST_PKG / "build" / "json-schemas" / "teams" / f"v{version}" / "MicrosoftTeams.schema.json"
    if not schema_path.exists():
        pytest.skip(f"npm package @microsoft/app-manifest not installed ({schema_path} missing)")
    assert package(tmp_path, "--bot-id", BOT_ID, "--bot-domain", "bot.example.com").returncode == 0
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    # The schema says draft-04 but uses draft-06 "const" (for manifestVersion);
    # Draft7Validator enforces it and reads everything else the same way.
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(built_manifest(tmp_path))]
    assert not errors, errors
