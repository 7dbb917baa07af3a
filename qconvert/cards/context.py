"""Everything the card template shows, computed from the manifest (and measurements)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from qconvert import manifest as mf
from qconvert.cards import markdown as md
from qconvert.cards.base import (
    Base,
    CardError,
    _cell,
    base_of,
    default_repo_name,
    formats_of,
    restricts_use,
)
from qconvert.contain import is_plain
from qconvert.sizes import human_size

HUB = "https://huggingface.co"
_BLOCK = re.compile(r"(blocks)\.\d+\.")


def _license(manifest: dict[str, Any], base: Base, files: set[str]) -> dict[str, Any]:
    card = dict(manifest.get("source", {}).get("card") or {})
    if base.kind == "tiny":
        return {
            "id": "apache-2.0",
            "name": None,
            "name_md": None,
            "link": None,
            "gated": None,
            "restricts": False,
            "known": True,
        }
    # The base card's front matter is not ours: only a plain license id, an http(s) URL or a
    # file of this repo get through, and the name is shown as code.
    link = card.get("license_link")
    if isinstance(link, str) and not re.match(r"^[a-z]+://", link):
        rel = link.lstrip("./")
        if rel in files:
            link = md.relative_link(rel)  # the base's LICENSE file was copied into this repo
        elif base.repo_id and is_plain(rel):
            ref = base.commit or base.revision or "main"
            link = md.url(f"{HUB}/{base.repo_id}/blob/{ref}/{md.relative_link(rel)}")
        else:
            link = None
    else:
        link = md.url(link)
    license_id = card.get("license")
    if isinstance(license_id, list):  # the Hub allows a list; the first is the main one
        license_id = license_id[0] if license_id else None
    license_id = md.license_id(license_id)
    name = card.get("license_name")
    name = md.one_line(name) if isinstance(name, str) and name else None
    return {
        "id": license_id,
        "name": name,
        "name_md": md.code(name) if name else None,
        "link": link,
        "gated": md.text(card["gated"]) if card.get("gated") else None,
        "restricts": restricts_use(license_id, name),
        "known": bool(license_id),
    }


def _pipeline_tag(manifest: dict[str, Any]) -> str:
    recipe = manifest.get("recipe", {})
    # Every family recipe records its tag; the generic recipe has none (its class matched no
    # family, else the family recipe would have been used).
    return str(recipe.get("pipeline_tag") or "text-to-image")


def _kept_groups(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for layer in layers:
        if layer["action"] != "keep":
            continue
        group = groups.setdefault(layer["reason"], {"count": 0, "names": []})
        group["count"] += 1
        name = _BLOCK.sub(r"\1.N.", layer["name"])
        if name not in group["names"]:
            group["names"].append(name)
    out = []
    for reason, group in groups.items():
        names = [md.code_cell(n) for n in group["names"][:4]]
        more = len(group["names"]) - len(names)
        out.append(
            {
                "count": group["count"],
                "names": ", ".join(names) + (f" and {more} more" if more > 0 else ""),
                "reason": md.cell(reason),
            }
        )
    return out


def _hardware(fmts: list[str]) -> list[dict[str, Any]]:
    from qconvert.formats import FORMATS
    from qconvert.loaders.runtime import DEVICE_LABELS, NATIVE_PATH, TABLE, WHY

    out = []
    for name in fmts:
        kind = FORMATS[name].tensor_type() if name in FORMATS else name
        rows = [
            {
                "device": _cell(DEVICE_LABELS.get(dclass, dclass)),
                "path": _cell(path.name),
                "description": _cell(path.description),
                "why": _cell(WHY.get(dclass, "")),
            }
            for (tensor, dclass), path in TABLE.items()
            if tensor == kind
        ]
        native = [
            DEVICE_LABELS.get(dclass, dclass).split(" (")[0]
            for (tensor, dclass), path in TABLE.items()
            if tensor == kind and path.name == NATIVE_PATH
        ]
        out.append({"format": name, "tensor": kind, "rows": rows, "native": native})
    return out


def _pip_version(version: str) -> str:
    return version.split("+", 1)[0]


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_FORMAT = re.compile(r"^[a-z0-9_]+$")


def _checked_base(base: Base) -> Base:
    """The base as far as it can be shown: a repo id and commit only when well-formed."""
    repo = base.repo_id if isinstance(base.repo_id, str) and _REPO_ID.match(base.repo_id) else None
    commit = base.commit if isinstance(base.commit, str) and _COMMIT.match(base.commit) else None
    return dataclasses.replace(base, repo_id=repo, commit=commit)


def context(
    manifest: dict[str, Any],
    repo_id: str | None = None,
    quality: dict[str, Any] | None = None,
    speed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the template shows, computed from the manifest (and measurements)."""
    try:
        return _context(manifest, repo_id, quality, speed)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise CardError(f"{mf.MANIFEST}: missing or malformed field ({e!r}); re-convert") from e


def _context(
    manifest: dict[str, Any],
    repo_id: str | None,
    quality: dict[str, Any] | None,
    speed: dict[str, Any] | None,
) -> dict[str, Any]:
    from qconvert.formats import FORMATS

    base = _checked_base(base_of(manifest))
    fmts = formats_of(manifest)
    bad = [f for f in fmts if not isinstance(f, str) or not _FORMAT.match(f)]
    if bad:
        raise CardError(f"{mf.MANIFEST}: format name {bad[0]!r} is malformed; re-convert")
    if repo_id is not None and not re.match(r"^[\w.-]+(/[\w.-]+)?$", repo_id):
        raise CardError(f"repo id {repo_id!r} cannot be shown in a card; use NAMESPACE/NAME")
    files = {str(row["path"]) for row in manifest["files"]}
    src = manifest["source"]
    summary = manifest["summary"]
    recipe = manifest["recipe"]
    versions = manifest["versions"]
    lic = _license(manifest, base, files)
    hardware = _hardware(fmts)
    tag = _pipeline_tag(manifest)
    quantized = [layer for layer in manifest["layers"] if layer["action"] != "keep"]
    by_format = [
        {
            "name": name,
            "upper": name.upper(),
            "description": md.cell(FORMATS[name].description if name in FORMATS else name),
            "bits": FORMATS[name].bits_per_element if name in FORMATS else None,
            "layers": sum(layer["action"] == name for layer in quantized),
        }
        for name in fmts
    ]
    family_title = recipe.get("title") or recipe.get("name", "")
    if base.kind == "tiny":
        title = f"tiny {family_title} (test artifact) — {' + '.join(f['upper'] for f in by_format)}"
    else:
        title = f"{base.name} — {' + '.join(f['upper'] for f in by_format)}"
    transformer_only = bool(manifest.get("transformer_only"))
    extra = []
    if recipe.get("extra_skips"):
        extra.append("--skip " + " ".join(md.code_cell(p) for p in recipe["extra_skips"]))
    if recipe.get("only"):
        extra.append("--only " + " ".join(md.code_cell(p) for p in recipe["only"]))
    if recipe.get("recipe_file"):
        name = Path(str(recipe["recipe_file"]["path"])).name
        extra.append(f"recipe file {md.code_cell(name)}")
    transformer_class = src.get("class", "")
    if not isinstance(transformer_class, str) or not transformer_class.isidentifier():
        raise CardError(f"{mf.MANIFEST}: source class {transformer_class!r} is not a class name")
    shown = {
        str(name): v if v == "not installed" else (md.version(v) or "unknown")
        for name, v in versions.items()
    }
    command = str(manifest["command"])
    shown_source = {
        "kind": str(src.get("kind", "")),
        "seed": md.text(src.get("seed")),
        "repo_id": md.text(src.get("repo_id")),
        "revision": md.code(src.get("revision")),
        "commit": md.code(src.get("commit")),
        "path": md.code(src.get("path")),
    }
    return {
        "title": md.text(title),
        "tiny": base.kind == "tiny",
        "base": base,
        "base_name": md.code(base.name),
        "base_commit": md.code(base.commit),
        # the manifest's text, shown as code (a revision may be any string in a manifest)
        "base_revision": md.code(base.revision) if base.revision != base.commit else None,
        "base_url": f"{HUB}/{base.repo_id}" if base.repo_id else None,
        "source": shown_source,
        "family": md.text(family_title),
        "formats": by_format,
        "torchao_config": md.code_cell(manifest["format"].get("torchao_config", {}).get("_type")),
        "summary": {
            "linear_layers": int(summary["linear_layers"]),
            "quantized_layers": int(summary["quantized_layers"]),
            "kept_layers": int(summary["linear_layers"]) - int(summary["quantized_layers"]),
            "share": f"{float(summary['quantized_share']):.1%}",
            "bf16": human_size(int(summary["bf16_bytes"])),
            "output": human_size(int(summary["output_bytes"])),
            "ratio": f"{float(summary['size_ratio']):.3f}×",
            "saved": human_size(int(summary["bf16_bytes"]) - int(summary["output_bytes"])),
            "repo": human_size(sum(int(row["size"]) for row in manifest["files"])),
        },
        "kept": _kept_groups(manifest["layers"]),
        "quantized_names": ", ".join(
            md.code(n) for n in dict.fromkeys(_BLOCK.sub(r"\1.N.", q["name"]) for q in quantized)
        ),
        "notes": [md.paragraph(note) for note in recipe.get("notes", [])],
        "recipe": md.code_cell(recipe.get("name")),
        "extra": extra,
        "hardware": hardware,
        "native": [d for d in hardware[0]["native"] if all(d in h["native"] for h in hardware)],
        "license": lic,
        "pipeline_tag": tag,
        "video": "video" in tag,
        "repo_id": repo_id or default_repo_name(manifest),
        "published": repo_id is not None,
        "transformer_only": transformer_only,
        "transformer_class": transformer_class,
        "subfolder": "" if transformer_only else "transformer/",
        "command": command,
        "fence": md.fence(command),
        "versions": [(md.text(k), v) for k, v in sorted(shown.items())],
        "pip": " ".join(
            f'"{name}=={_pip_version(shown[name])}"'
            for name in ("torch", "torchao", "diffusers", "transformers")
            if shown.get(name, "not installed") not in ("not installed", "unknown")
        ),
        "qconvert_version": shown.get("qconvert", "unknown"),
        "source_files": len(src.get("files", [])),
        "files": [
            {
                "path": md.code_cell(row["path"]),
                "size": human_size(int(row["size"])),
                "sha256": md.code(row["sha256"]),
            }
            for row in manifest["files"]
        ],
        "quality": quality,
        "speed": speed,
    }
