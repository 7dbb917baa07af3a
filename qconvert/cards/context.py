"""Everything the card template shows, computed from the manifest (and measurements)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qconvert import manifest as mf
from qconvert.cards.base import (
    Base,
    CardError,
    _cell,
    base_of,
    default_repo_name,
    formats_of,
    restricts_use,
)
from qconvert.sizes import human_size

HUB = "https://huggingface.co"
_BLOCK = re.compile(r"(blocks)\.\d+\.")


def _license(manifest: dict[str, Any], base: Base, files: set[str]) -> dict[str, Any]:
    card = dict(manifest.get("source", {}).get("card") or {})
    if base.kind == "tiny":
        return {
            "id": "apache-2.0",
            "name": None,
            "link": None,
            "gated": None,
            "restricts": False,
            "known": True,
        }
    link = card.get("license_link")
    if link and not re.match(r"^[a-z]+://", str(link)):
        if str(link).lstrip("./") in files:
            link = str(link).lstrip("./")  # the base's LICENSE file was copied into this repo
        elif base.repo_id:
            ref = base.commit or base.revision or "main"
            link = f"{HUB}/{base.repo_id}/blob/{ref}/{str(link).lstrip('./')}"
        else:
            link = None
    license_id = card.get("license")
    if isinstance(license_id, list):  # the Hub allows a list; the first is the main one
        license_id = license_id[0] if license_id else None
    return {
        "id": license_id,
        "name": card.get("license_name"),
        "link": link,
        "gated": card.get("gated"),
        "restricts": restricts_use(license_id, card.get("license_name")),
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
        names = [f"`{n}`" for n in group["names"][:4]]
        more = len(group["names"]) - len(names)
        out.append(
            {
                "count": group["count"],
                "names": _cell(", ".join(names) + (f" and {more} more" if more > 0 else "")),
                "reason": _cell(reason),
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


def context(
    manifest: dict[str, Any],
    repo_id: str | None = None,
    quality: dict[str, Any] | None = None,
    speed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the template shows, computed from the manifest (and measurements)."""
    try:
        return _context(manifest, repo_id, quality, speed)
    except (KeyError, TypeError, AttributeError) as e:
        raise CardError(f"{mf.MANIFEST}: missing or malformed field ({e!r}); re-convert") from e


def _context(
    manifest: dict[str, Any],
    repo_id: str | None,
    quality: dict[str, Any] | None,
    speed: dict[str, Any] | None,
) -> dict[str, Any]:
    from qconvert.formats import FORMATS

    base = base_of(manifest)
    fmts = formats_of(manifest)
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
            "description": FORMATS[name].description if name in FORMATS else name,
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
        extra.append("--skip " + " ".join(f"`{p}`" for p in recipe["extra_skips"]))
    if recipe.get("only"):
        extra.append("--only " + " ".join(f"`{p}`" for p in recipe["only"]))
    if recipe.get("recipe_file"):
        extra.append(f"recipe file `{Path(str(recipe['recipe_file']['path'])).name}`")
    return {
        "title": title,
        "tiny": base.kind == "tiny",
        "base": base,
        "base_url": f"{HUB}/{base.repo_id}" if base.repo_id else None,
        "source": src,
        "family": family_title,
        "formats": by_format,
        "torchao_config": manifest["format"].get("torchao_config", {}).get("_type"),
        "summary": {
            "linear_layers": summary["linear_layers"],
            "quantized_layers": summary["quantized_layers"],
            "kept_layers": summary["linear_layers"] - summary["quantized_layers"],
            "share": f"{float(summary['quantized_share']):.1%}",
            "bf16": human_size(int(summary["bf16_bytes"])),
            "output": human_size(int(summary["output_bytes"])),
            "ratio": f"{float(summary['size_ratio']):.3f}×",
            "saved": human_size(int(summary["bf16_bytes"]) - int(summary["output_bytes"])),
            "repo": human_size(sum(int(row["size"]) for row in manifest["files"])),
        },
        "kept": _kept_groups(manifest["layers"]),
        "quantized_names": ", ".join(
            f"`{n}`" for n in dict.fromkeys(_BLOCK.sub(r"\1.N.", q["name"]) for q in quantized)
        ),
        "notes": list(recipe.get("notes", [])),
        "recipe": recipe.get("name"),
        "extra": extra,
        "hardware": hardware,
        "native": [d for d in hardware[0]["native"] if all(d in h["native"] for h in hardware)],
        "license": lic,
        "pipeline_tag": tag,
        "video": "video" in tag,
        "repo_id": repo_id or default_repo_name(manifest),
        "published": repo_id is not None,
        "transformer_only": transformer_only,
        "transformer_class": src.get("class", ""),
        "subfolder": "" if transformer_only else "transformer/",
        "command": manifest["command"],
        "versions": sorted(versions.items()),
        "pip": " ".join(
            f'"{name}=={_pip_version(versions[name])}"'
            for name in ("torch", "torchao", "diffusers", "transformers")
            if versions.get(name, "not installed") != "not installed"
        ),
        "qconvert_version": versions.get("qconvert", "unknown"),
        "source_files": len(src.get("files", [])),
        "files": [
            {
                "path": _cell(row["path"]),
                "size": human_size(int(row["size"])),
                "sha256": row["sha256"],
            }
            for row in manifest["files"]
        ],
        "quality": quality,
        "speed": speed,
    }
