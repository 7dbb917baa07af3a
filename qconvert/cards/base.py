"""What a card says about the base model: its repo id and commit (from the manifest's
``source.base_model`` record, the Hub source, or a Hugging Face cache path), a display name, the
default repo name, and whether a license restricts use."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from qconvert.errors import QconvertError

HUB_CACHE_PATH = re.compile(
    r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<sha>[0-9a-f]{40})$"
)
_NON_COMMERCIAL = re.compile(r"(^|[-_ ])nc([-_ .]|$)|non[-_ ]?commercial", re.IGNORECASE)


class CardError(QconvertError, ValueError):
    """A card that cannot be rendered (bad manifest or measurement file); says which file."""


@dataclass(frozen=True)
class Base:
    """Where the output's bf16 weights came from, as far as the manifest can say."""

    repo_id: str | None  # a Hub repo id, when known
    commit: str | None
    name: str  # short display name, also the stem of the default repo name
    kind: str  # "hub", "local", "tiny", ...
    revision: str | None = None  # a branch or tag, when that is what is known
    origin: str | None = None  # where a local source's base came from: "flag", "hub cache
    # path", "local-dir metadata" (convert.base_model)


def base_of(manifest: dict[str, Any]) -> Base:
    src = manifest.get("source", {})
    kind = str(src.get("kind", "local"))
    if kind == "tiny":
        return Base(None, None, f"tiny-{src.get('family', 'model')}", kind)
    path = str(src.get("path", "model")).rstrip("/")
    folder = path.rsplit("/", 1)[-1] or "model"
    recorded = src.get("base_model")
    if isinstance(recorded, dict):  # --base-model, a cache path, --local-dir metadata
        repo = recorded.get("repo_id")
        name = str(repo).rsplit("/", 1)[-1] if repo else folder
        return Base(
            str(repo) if repo else None,
            recorded.get("commit"),
            name,
            kind,
            recorded.get("revision"),
            recorded.get("from"),
        )
    if src.get("repo_id"):
        repo = str(src["repo_id"])
        return Base(repo, src.get("commit"), repo.rsplit("/", 1)[-1], kind)
    cached = HUB_CACHE_PATH.search(path)
    if cached:  # a folder of the Hub cache (manifests from before base_model was recorded)
        repo = f"{cached['org']}/{cached['name']}"
        return Base(repo, cached["sha"], cached["name"], kind, None, "hub cache path")
    return Base(None, None, folder, kind)


def formats_of(manifest: dict[str, Any]) -> list[str]:
    """The formats the output holds (more than one for mixed recipes), sorted."""
    found = manifest.get("formats") or sorted(
        {layer["action"] for layer in manifest.get("layers", []) if layer["action"] != "keep"}
    )
    return list(found) or [manifest["format"]["name"]]


def default_repo_name(manifest: dict[str, Any]) -> str:
    """``<base model name>-<format>``, e.g. ``FLUX.1-dev-nvfp4``, within the Hub's name rules."""
    name = f"{base_of(manifest).name}-{'-'.join(formats_of(manifest))}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    name = re.sub(r"([-.])[-.]+", r"\1", name).strip("-.")
    return name[:96] or "qconvert-model"


def restricts_use(license_id: str | None, license_name: str | None) -> bool:
    """Whether a license is known to restrict use (non-commercial), from its Hub metadata."""
    return any(_NON_COMMERCIAL.search(text or "") for text in (license_id, license_name))


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
