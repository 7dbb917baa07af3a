"""``qconvert.json``: what was converted, from what, how, with which versions, and every file's
hash. Written with sorted keys and no timestamps, so the same inputs give the same bytes."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from qconvert.convert.plan import Plan
from qconvert.convert.source import Source, sha256_file

MANIFEST = "qconvert.json"
SCHEMA = 1
PACKAGES = (
    "qconvert",
    "torch",
    "torchao",
    "diffusers",
    "transformers",
    "safetensors",
    "huggingface_hub",
)


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def file_table(
    root: Path,
    exclude: tuple[str, ...] = (MANIFEST, "README.md"),  # the card: it lists these hashes
    known: dict[str, str] | None = None,
) -> list[dict[str, object]]:
    """Every file under ``root`` with size and sha256 (``known`` hashes are not recomputed)."""
    known = known or {}
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        digest = known.get(rel) or sha256_file(path)
        rows.append({"path": rel, "size": path.stat().st_size, "sha256": digest})
    return rows


def source_table(source: Source, copied: list[str]) -> list[dict[str, object]]:
    """Hashes of every source file the output was made from (shards, configs, components)."""
    paths = {h.path for h in source.shards}
    paths.add(source.transformer_dir / "config.json")
    for rel in copied:
        paths.add(source.root / rel)
    rows = []
    for path in sorted(paths):
        rows.append(
            {
                "path": path.relative_to(source.root).as_posix(),
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    return rows


def build(
    plan: Plan,
    source: Source,
    command: str,
    source_files: list[dict[str, object]],
    files: list[dict[str, object]],
    transformer_only: bool,
) -> dict[str, object]:
    from torchao.core.config import config_to_dict

    recipe = plan.recipe
    user = plan.selection.user
    return {
        "schema": SCHEMA,
        "tool": "qconvert",
        "command": command,
        "versions": versions(),
        "source": {**source.description, "class": source.class_name, "files": source_files},
        "format": {
            "name": plan.fmt.name,
            "description": plan.fmt.description,
            "bits_per_element": plan.fmt.bits_per_element,
            "torchao_config": config_to_dict(plan.fmt.config()),
        },
        "formats": plan.formats,
        "recipe": {
            "name": recipe.name,
            "title": recipe.title,
            "pipeline_tag": recipe.pipeline_tag,
            "min_features": recipe.min_features,
            "only_repeated_blocks": recipe.only_repeated_blocks,
            "skip": [{"pattern": r.pattern, "reason": r.reason} for r in recipe.skip],
            "notes": list(recipe.notes),
            "extra_skips": list(plan.selection.skips),
            "only": list(plan.selection.only),
            "recipe_file": None
            if user is None
            else {
                "path": user.path,
                "format": user.format,
                "rules": [
                    {"pattern": r.pattern, "format": r.action, "reason": r.reason}
                    for r in user.rules
                ],
            },
            "unmatched_patterns": plan.unmatched,
        },
        "transformer_only": transformer_only,
        "summary": plan.summary(),
        "layers": [
            {
                "name": layer.name,
                "shape": list(layer.shape),
                "action": layer.action,
                "reason": layer.reason,
            }
            for layer in plan.layers
        ],
        "files": files,
    }


def dumps(manifest: dict[str, object]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def load(root: Path) -> dict[str, object]:
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {MANIFEST}; not a qconvert output")
    return json.loads(path.read_text(encoding="utf-8"))
