"""Build the Teams app package: build/appPackage.zip (manifest.json + icons).

Usage: python scripts/package_manifest.py [--bot-id GUID] [--bot-domain HOST]
                                          [--privacy-url URL] [--terms-url URL] [--out PATH]
The bot id defaults to env MicrosoftAppId, the domain to env BOT_DOMAIN, the privacy and terms
links to env PRIVACY_URL / TERMS_URL, else to the repository's PRIVACY.md and TERMS.md (the
template's links; publish your own for a deployment others use).
Standard library only, so packaging needs nothing installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST_DIR = ROOT / "manifest"
DEFAULT_OUT = ROOT / "build" / "appPackage.zip"
ICON_SIZES = {"color.png": (192, 192), "outline.png": (32, 32)}
GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PackageError(Exception):
    """A problem that stops packaging; its message is shown as one line."""


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (always the first chunk)."""
    head = path.read_bytes()[:24]
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise PackageError(f"{path.name} is not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def render_manifest(template: str, bot_id: str, bot_domain: str | None, *,
                    privacy_url: str | None = None, terms_url: str | None = None) -> dict:
    """Fill the placeholders of the template and return the manifest."""
    manifest = json.loads(template.replace("${{BOT_ID}}", bot_id))
    if privacy_url:
        manifest["developer"]["privacyUrl"] = privacy_url
    if terms_url:
        manifest["developer"]["termsOfUseUrl"] = terms_url
    domains = [d for d in manifest.get("validDomains", []) if d != "${{BOT_DOMAIN}}"]
    if bot_domain:
        domains.append(bot_domain)
    if domains:
        manifest["validDomains"] = domains
    else:
        manifest.pop("validDomains", None)
    return manifest


def validate(manifest: dict, manifest_dir: Path) -> None:
    """Check what Teams would reject and the schema cannot see."""
    if "${{" in json.dumps(manifest):
        raise PackageError("manifest still has an unfilled ${{...}} placeholder")
    for bot in manifest.get("bots", []):
        if not GUID.match(bot.get("botId", "")):
            raise PackageError(f"bot id {bot.get('botId')!r} is not a GUID")
        for command_list in bot.get("commandLists", []):
            titles = [c["title"] for c in command_list["commands"]]
            if len(titles) != len(set(titles)):
                raise PackageError(f"duplicate commands in scopes {command_list['scopes']}: {titles}")
    for name, size in ICON_SIZES.items():
        found = png_size(manifest_dir / name)
        if found != size:
            raise PackageError(f"{name} is {found[0]}x{found[1]}, Teams needs {size[0]}x{size[1]}")


def build(bot_id: str, bot_domain: str | None, out: Path, manifest_dir: Path = MANIFEST_DIR, *,
          privacy_url: str | None = None, terms_url: str | None = None) -> Path:
    """Write the zip and return its path."""
    if not GUID.match(bot_id):
        raise PackageError(f"bot id {bot_id!r} is not a GUID (MicrosoftAppId of the Azure Bot)")
    for name, url in (("privacy", privacy_url), ("terms", terms_url)):
        if url and not url.startswith("https://"):
            raise PackageError(f"the {name} URL {url!r} must start with https:// (Teams requires it)")
    template = (manifest_dir / "manifest.template.json").read_text(encoding="utf-8")
    manifest = render_manifest(template, bot_id, bot_domain, privacy_url=privacy_url, terms_url=terms_url)
    validate(manifest, manifest_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        for name in ICON_SIZES:
            zf.write(manifest_dir / name, name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Teams app package (appPackage.zip).")
    parser.add_argument("--bot-id", default=os.environ.get("MicrosoftAppId"),
                        help="bot's Microsoft App ID (default: env MicrosoftAppId)")
    parser.add_argument("--bot-domain", default=os.environ.get("BOT_DOMAIN"),
                        help="bot's public host name (default: env BOT_DOMAIN)")
    parser.add_argument("--privacy-url", default=os.environ.get("PRIVACY_URL"),
                        help="privacy statement (default: env PRIVACY_URL, else the repository's PRIVACY.md)")
    parser.add_argument("--terms-url", default=os.environ.get("TERMS_URL"),
                        help="terms of use (default: env TERMS_URL, else the repository's TERMS.md)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"zip to write (default: {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if not args.bot_id:
        print("error: no bot id: set MicrosoftAppId (the Azure Bot's app id) or pass --bot-id", file=sys.stderr)
        return 2
    bot_domain = (args.bot_domain or "").strip() or None
    if bot_domain is None:
        print("note: BOT_DOMAIN is not set, so the manifest lists no validDomains. That is fine for a bot "
              "Teams only messages; for links to the bot's own host, set BOT_DOMAIN to that host name "
              "(e.g. BOT_DOMAIN=mybot.azurewebsites.net make package) or pass --bot-domain.", file=sys.stderr)
    try:
        out = build(args.bot_id.strip(), bot_domain, args.out, privacy_url=(args.privacy_url or "").strip() or None,
                    terms_url=(args.terms_url or "").strip() or None)
    except PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
