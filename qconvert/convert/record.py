"""What a conversion records beside its weights: transformer/config.json with the
quantization_config diffusers reads, the shard index, and the manifest's content."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from qconvert.convert.plan import Plan
from qconvert.convert.source import WEIGHTS_INDEX, Source
from qconvert.convert.writer import quantization_metadata
from qconvert.formats import FORMATS
from qconvert.manifest import SCHEMA, sha256_file, versions


def write_index(plan: Plan, dst: Path, weight_map: dict[str, str]) -> None:
    if len(plan.shards) == 1:
        return
    meta = {k: v for k, v in quantization_metadata(plan).items() if k != "format"}
    index = {
        "metadata": {"total_size": plan.output_bytes, **meta},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (dst / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def config_json(plan: Plan, source: Source) -> str:
    """transformer/config.json: the source's config + the quantization_config diffusers reads."""
    from diffusers import TorchAoConfig

    kept = [layer.name for layer in plan.layers if not layer.quantized]
    weights = [f"{layer.name}.weight" for layer in plan.layers if layer.quantized]
    if plan.formats == [plan.fmt.name]:
        quant_type = plan.fmt.config()  # what diffusers writes for a one-format model
    else:
        from torchao.quantization import FqnToConfig

        quant_type = FqnToConfig(
            {layer.name: FORMATS[layer.action].config() for layer in plan.layers if layer.quantized}
        )
    # diffusers matches modules_to_not_convert by substring (`key + "."` in the parameter name,
    # or `key ==` it): a kept root `proj_out` would also keep every
    # `single_transformer_blocks.N.proj_out`. Such a layer is named by its weight: exact.
    not_convert = [
        f"{name}.weight" if any(f"{name}." in w for w in weights) else name for name in kept
    ]
    config = dict(source.config)
    config["quantization_config"] = TorchAoConfig(
        quant_type, modules_to_not_convert=not_convert
    ).to_dict()
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def source_table(
    source: Source, copied: list[str], on_hash: Callable[[str, str], None] | None = None
) -> list[dict[str, object]]:
    """Hashes of every source file the output was made from (shards, configs, components).
    The shards are hashed first; ``on_hash(path, sha256)`` hears of each file as it is done."""
    shards = sorted({h.path for h in source.shards})
    others = {source.transformer_dir / "config.json"} | {source.root / rel for rel in copied}
    rows = []
    for path in [*shards, *sorted(others - set(shards))]:
        rel = path.relative_to(source.root).as_posix()
        digest = sha256_file(path)
        if on_hash is not None:
            on_hash(rel, digest)
        rows.append({"path": rel, "size": path.stat().st_size, "sha256": digest})
    return sorted(rows, key=lambda row: PurePosixPath(str(row["path"])))  # as Paths sort


def manifest(
    plan: Plan,
    source: Source,
    command: str,
    source_files: list[dict[str, object]],
    files: list[dict[str, object]],
    transformer_only: bool,
    base: dict[str, object] | None = None,
) -> dict[str, object]:
    from torchao.core.config import config_to_dict

    recipe = plan.recipe
    user = plan.selection.user
    described = {**source.description, "class": source.class_name, "files": source_files}
    if base is not None:  # only when there is something to say: plain runs are unchanged
        described["base_model"] = base
    return {
        "schema": SCHEMA,
        "tool": "qconvert",
        "command": command,
        "versions": versions(),
        "source": described,
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
