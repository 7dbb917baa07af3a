"""Human-readable view of a qconvert output, from its manifest."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qconvert.convert import manifest as mf
from qconvert.convert.source import sha256_file

_BLOCK = re.compile(r"(blocks)\.\d+\.")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def render(root: Path) -> tuple[str, dict[str, Any]]:
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or directory")
    data: dict[str, Any] = mf.load(root)
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
        f"transformer: {_gib(s['bf16_bytes'])} as bf16 → {_gib(s['output_bytes'])} "
        f"({s['size_ratio']:.3f}×, saves {_gib(s['bf16_bytes'] - s['output_bytes'])})",
        "",
        "layers (blocks collapsed: N = every block index):",
    ]
    rows: dict[tuple[str, str, str], int] = {}
    for layer in data["layers"]:
        key = (
            _BLOCK.sub(r"\1.N.", layer["name"]),
            "x".join(map(str, layer["shape"])),
            f"{layer['action']}" + ("" if layer["action"] != "keep" else f" ({layer['reason']})"),
        )
        rows[key] = rows.get(key, 0) + 1
    width = max((len(k[0]) for k in rows), default=10)
    for (name, shape, what), count in rows.items():
        lines.append(f"  {name:<{width}}  {shape:>11}  ×{count:<3} {what}")
    return "\n".join(lines), data


def verify_files(root: Path, data: dict[str, Any]) -> None:
    """Raise ValueError naming the first file that is missing or differs from the manifest."""
    for row in data["files"]:
        path = root / row["path"]
        if not path.is_file():
            raise ValueError(f"{path}: listed in {mf.MANIFEST} but missing")
        if path.stat().st_size != row["size"] or sha256_file(path) != row["sha256"]:
            raise ValueError(f"{path}: differs from {mf.MANIFEST} (sha256 mismatch)")
