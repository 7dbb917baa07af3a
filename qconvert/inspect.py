"""Human-readable views: a qconvert output (from its manifest) and a conversion plan."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qconvert import manifest as mf
from qconvert.errors import ManifestError
from qconvert.sizes import human_size

if TYPE_CHECKING:
    from qconvert.convert.plan import Plan

_BLOCK = re.compile(r"(blocks)\.\d+\.")


def render(root: Path) -> tuple[str, dict[str, Any]]:
    if not root.exists():
        raise ManifestError(f"{root}: no such file or directory")
    data: dict[str, Any] = mf.load(root)
    try:
        return _render(root, data), data
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ManifestError(
            f"{root / mf.MANIFEST}: missing or malformed field ({e!r}); not a complete qconvert "
            f"manifest: re-convert"
        ) from None


def _render(root: Path, data: dict[str, Any]) -> str:
    s = data["summary"]
    src = data["source"]
    where = (
        src.get("repo_id")
        or src.get("path")
        or f"tiny {src.get('family')} (seed {src.get('seed')})"
    )
    if src.get("commit"):
        where += f" @ {src['commit']}"
    lines = [
        f"{root}: {data['format']['name']} ({data['format']['description']})",
        f"source: {where} [{src.get('class')}]",
        f"recipe: {data['recipe']['name']}"
        + (
            f" + --skip {' '.join(data['recipe']['extra_skips'])}"
            if data["recipe"]["extra_skips"]
            else ""
        ),
        f"made by: {data['command']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in sorted(data["versions"].items())),
        f"params: {s['params']:,} ({s['params_quantized']:,} quantized, "
        f"{s['quantized_share']:.1%})",
        f"transformer: {human_size(s['bf16_bytes'])} as bf16 → {human_size(s['output_bytes'])} "
        f"({s['size_ratio']:.3f}×, saves {human_size(s['bf16_bytes'] - s['output_bytes'])})",
        "",
        "layers (blocks collapsed: N = every block index):",
        *layer_table(data["layers"], collapse=True),
    ]
    return "\n".join(lines)


def layer_table(layers: list[dict[str, Any]], collapse: bool) -> list[str]:
    """Rows of name, shape, decision (and the reason when kept); block indices collapsed to N
    with a count when ``collapse``."""
    rows: dict[tuple[str, str, str], int] = {}
    for layer in layers:
        name = _BLOCK.sub(r"\1.N.", layer["name"]) if collapse else layer["name"]
        reason = layer["reason"]
        what = layer["action"] + ("" if reason == "quantized" else f" ({reason})")
        key = (name, "x".join(map(str, layer["shape"])), what)
        rows[key] = rows.get(key, 0) + 1
    width = max((len(k[0]) for k in rows), default=10)
    count = (lambda n: f"×{n:<3} ") if collapse else (lambda n: "")
    return [
        f"  {name:<{width}}  {shape:>11}  {count(n)}{what}"
        for (name, shape, what), n in rows.items()
    ]


def plan_dict(plan: Plan) -> dict[str, Any]:
    return {
        "recipe": plan.recipe.name,
        "transformer_class": plan.source_class,
        "source": plan.source_description,
        "default_format": plan.fmt.name,
        "formats": plan.formats,
        "summary": plan.summary(),
        "unmatched_patterns": plan.unmatched,
        "layers": [
            {"name": x.name, "shape": list(x.shape), "action": x.action, "reason": x.reason}
            for x in plan.layers
        ],
    }


def render_plan(plan: Plan, as_json: bool, every_layer: bool = False) -> str:
    """The plan as text (repeated blocks collapsed to ``blocks.N`` unless ``every_layer``) or
    as JSON (always every layer)."""
    data = plan_dict(plan)
    if as_json:
        return json.dumps(data, indent=2, sort_keys=True)
    s = data["summary"]
    lines = [
        f"plan: {plan.source_class} with recipe {plan.recipe.name} ({plan.recipe.title}), "
        f"format {', '.join(plan.formats) or plan.fmt.name}",
        "layers (every layer):"
        if every_layer
        else "layers (blocks collapsed: N = every block index; --all lists every layer):",
        *layer_table(data["layers"], collapse=not every_layer),
        "",
        f"{s['quantized_layers']}/{s['linear_layers']} Linear layers quantized; "
        f"{s['params_quantized']:,} of {s['params']:,} params ({s['quantized_share']:.1%})",
        f"transformer: {human_size(s['bf16_bytes'])} as bf16 → "
        f"{human_size(s['output_bytes'])} estimated "
        f"({s['size_ratio']:.3f}×)",
    ]
    if plan.unmatched:
        lines.append(f"patterns matching no layer: {', '.join(plan.unmatched)}")
    return "\n".join(lines)
