"""Model cards: the README.md of a qconvert output, rendered from its manifest.

The card is a function of ``qconvert.json`` (plus the optional ``quality.json`` / ``speed.json``
beside it and the repo id it is published under), so ``qconvert card DIR`` reproduces it and two
identical conversions write identical cards: no timestamps, no paths of the machine that renders
it. The template is ``template.md.j2``, rendered through huggingface_hub's ``ModelCard`` with a
``ModelCardData`` header (license, base_model, base_model_relation, pipeline_tag, library_name,
tags). The hardware matrix is rendered from ``qconvert.loaders.runtime.TABLE``, the table the
loader itself runs.

Measurements are never invented: the quality and speed sections appear only when a measurement
file exists. Both files share one schema::

    {
      "setup": "FLUX.1-dev 1024x1024, 28 steps, guidance 3.5, 8 prompts x 2 seeds",  # required
      "device": "NVIDIA B200",                         # optional
      "reference": "bf16 pipeline, same prompts and seeds",  # optional
      "command": "python bench.py --format nvfp4",     # optional: how to reproduce it
      "rows": [                                        # required: one table row per object
        {"metric": "LPIPS (alex) vs bf16", "value": 0.071, "note": "lower is better"}
      ]
    }

Row values are strings, numbers, booleans or null; the table's columns are the rows' keys in
first-seen order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qconvert import manifest as mf
from qconvert.errors import QconvertError
from qconvert.sizes import human_size

CARD = "README.md"
QUALITY = "quality.json"
SPEED = "speed.json"
# Files an output may hold besides those its manifest lists.
EXTRA_FILES = (mf.MANIFEST, CARD, QUALITY, SPEED)
TEMPLATE = Path(__file__).with_name("template.md.j2")
HUB = "https://huggingface.co"
TAGS = ("torchao", "qconvert")
PIPELINE_TAGS = ("text-to-image", "text-to-video", "image-to-image", "image-to-video")
# Names for the loader's device classes (runtime.device_class); an unnamed class shows as is.
DEVICE_LABELS = {
    "sm100": "NVIDIA Blackwell (compute capability 10.0+)",
    "sm89": "NVIDIA Ada / Hopper (compute capability 8.9, 9.x)",
    "sm80": "NVIDIA Ampere (compute capability 8.0–8.7)",
    "gpu": "older CUDA GPUs (before sm80)",
    "cpu": "CPU",
}
NATIVE_PATH = "native"  # runtime path name: the weights run as saved
_HUB_CACHE_PATH = re.compile(
    r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<sha>[0-9a-f]{40})$"
)
_BLOCK = re.compile(r"(blocks)\.\d+\.")
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


def base_of(manifest: dict[str, Any]) -> Base:
    src = manifest.get("source", {})
    kind = str(src.get("kind", "local"))
    if kind == "tiny":
        return Base(None, None, f"tiny-{src.get('family', 'model')}", kind)
    if src.get("repo_id"):
        repo = str(src["repo_id"])
        return Base(repo, src.get("commit"), repo.rsplit("/", 1)[-1], kind)
    path = str(src.get("path", "model")).rstrip("/")
    cached = _HUB_CACHE_PATH.search(path)
    if cached:  # a folder of the Hub cache: the repo and commit are in its path
        repo = f"{cached['org']}/{cached['name']}"
        return Base(repo, cached["sha"], cached["name"], kind)
    return Base(None, None, path.rsplit("/", 1)[-1] or "model", kind)


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


def read_measurement(root: Path, name: str) -> dict[str, Any] | None:
    """``quality.json`` / ``speed.json`` checked against the schema above; None when absent."""
    path = root / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("setup"), str):
        raise CardError(f'{path}: expected an object with a "setup" string and "rows"')
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise CardError(f'{path}: "rows" must be a non-empty list of objects')
    for i, row in enumerate(rows, start=1):
        for key, value in row.items():
            if not isinstance(value, str | int | float | bool | type(None)):
                raise CardError(f"{path}: row {i}, {key!r}: values must be scalars")
    for key in ("device", "reference", "command"):
        if key in data and not isinstance(data[key], str):
            raise CardError(f'{path}: "{key}" must be a string')
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return {
        "setup": data["setup"],
        "device": data.get("device"),
        "reference": data.get("reference"),
        "command": data.get("command"),
        "columns": [_cell(c) for c in columns],
        "rows": [[_cell(_value(row.get(c))) for c in columns] for row in rows],
    }


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
            link = f"{HUB}/{base.repo_id}/blob/{base.commit or 'main'}/{str(link).lstrip('./')}"
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
    from qconvert.loaders.runtime import TABLE, WHY

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


def card_data(ctx: dict[str, Any]) -> Any:
    """The YAML header, as huggingface_hub's ``ModelCardData``."""
    from huggingface_hub import ModelCardData

    lic = ctx["license"]
    return ModelCardData(
        base_model=ctx["base"].repo_id,
        base_model_relation="quantized" if ctx["base"].repo_id else None,
        library_name="diffusers",
        pipeline_tag=ctx["pipeline_tag"],
        license=lic["id"],
        license_name=lic["name"],
        license_link=lic["link"],
        tags=[TAGS[0], *(f["name"] for f in ctx["formats"]), *TAGS[1:]],
    )


def render_card(output_dir: str | Path, repo_id: str | None = None) -> str:
    """The README.md text for a qconvert output folder.

    ``repo_id`` is the Hub id the usage snippets load (default: the default repo name, which is
    also the CLI's default output folder name).
    """
    from huggingface_hub import ModelCard

    root = Path(output_dir)
    try:
        manifest = mf.load(root)
    except FileNotFoundError as e:
        raise CardError(str(e)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{root / mf.MANIFEST}: not readable JSON ({e})") from e
    ctx = context(manifest, repo_id, read_measurement(root, QUALITY), read_measurement(root, SPEED))
    card = ModelCard.from_template(
        card_data(ctx), template_str=TEMPLATE.read_text(encoding="utf-8"), **ctx
    )
    text = str(card).rstrip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def write_card(output_dir: str | Path, repo_id: str | None = None) -> Path:
    """Render the card and write it to ``output_dir/README.md``; returns the path."""
    path = Path(output_dir) / CARD
    text = render_card(output_dir, repo_id)
    path.write_text(text, encoding="utf-8")
    return path


__all__ = [
    "CARD",
    "EXTRA_FILES",
    "QUALITY",
    "SPEED",
    "CardError",
    "default_repo_name",
    "render_card",
    "restricts_use",
    "write_card",
]
