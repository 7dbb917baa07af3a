"""Measurement files beside a manifest, rendered as card tables.

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
first-seen order. ``qconvert eval`` and ``qconvert bench`` (``qconvert/evaluate``) also write
fields the card shows when present (a hand-written file may leave them out)::

    {
      "picture": "quality.png",        # quality: bf16 | quantized side by side, beside the file
      "notes": ["measured on a CPU: ..."],              # shown under the table
      "versions": {"torch": "2.11.0+cu130", ...},       # the baseline's libraries
      "real_shape": false,             # real architecture with random weights
      "tiny": false,                   # qconvert's tiny test pipeline
      ...                              # anything else (settings, per-prompt rows, raw timings)
    }                                  # is for machines and not checked here
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qconvert.cards import markdown as md
from qconvert.cards.base import CardError, _value
from qconvert.contain import ContainmentError, inside

QUALITY = "quality.json"
SPEED = "speed.json"
PICTURE = "quality.png"
SHOWN_VERSIONS = ("torch", "torchao", "diffusers", "triton", "cuda")


def read_measurement(root: Path, name: str) -> dict[str, Any] | None:
    """``quality.json`` / ``speed.json`` checked against the schema above; None when absent."""
    try:
        path = inside(root, name, f"{root}: measurement file")  # a link out is not read
    except ContainmentError as e:
        raise CardError(str(e)) from None
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
    shown, problem = _extras(root, data)
    if problem:
        raise CardError(f"{path}: {problem}")
    # Shown as text that opens no markdown structure (the file is not qconvert's).
    return {
        **shown,
        "setup": md.paragraph(data["setup"]),
        "device": md.text(data["device"]) if data.get("device") else None,
        "reference": md.text(data["reference"]) if data.get("reference") else None,
        "command": md.code(data["command"]) if data.get("command") else None,
        "columns": [md.cell(c) for c in columns],
        "rows": [[md.cell(_value(row.get(c))) for c in columns] for row in rows],
    }


def _extras(root: Path, data: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The optional fields the card shows, escaped, or the first problem as a message."""
    out: dict[str, Any] = {"picture": None, "notes": [], "versions": None}
    picture = data.get("picture")
    if picture is not None:
        if picture != PICTURE:
            return out, f'"picture" must be "{PICTURE}" (the file push uploads)'
        try:
            found = inside(root, PICTURE, f"{root}: picture").is_file()
        except ContainmentError as e:
            return out, str(e)
        if not found:
            return out, f'"picture": {PICTURE} is missing beside it; re-run qconvert eval'
        out["picture"] = md.relative_link(PICTURE)
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        return out, '"notes" must be a list of strings'
    out["notes"] = [md.text(n) for n in notes]
    for key in ("real_shape", "tiny"):
        if not isinstance(data.get(key, False), bool):
            return out, f'"{key}" must be true or false'
    versions = data.get("versions")
    if versions is not None:
        if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
            return out, '"versions" must map package names to version strings'
        shown = [f"{k} {versions[k]}" for k in SHOWN_VERSIONS if k in versions]
        out["versions"] = md.text(", ".join(shown)) if shown else None
    return out, None
