"""The output contract, ``qconvert.json``: what was converted, from what, how, with which
versions, and every file's hash. Written with sorted keys and no timestamps, so the same inputs
give the same bytes. Reading it (``load``), checking a folder against it (``verify``) and
hashing files (``sha256_file``) live here; what goes into it is ``convert.record``'s job."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from qconvert.contain import ContainmentError, inside
from qconvert.errors import ManifestError

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


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def dumps(manifest: dict[str, object]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def load(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root}: no {MANIFEST}; not a qconvert output")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{path}: not readable JSON ({type(e).__name__}); re-convert") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: not a qconvert manifest (not a JSON object); re-convert")
    return data


def listed_files(root: Path, data: dict[str, Any]) -> list[tuple[dict[str, Any], Path]]:
    """The manifest's ``files`` rows with their paths, each checked to stay inside ``root``
    (``qconvert.contain``: no absolute path, no ``..``, no link); ManifestError otherwise."""
    rows = data.get("files")
    where = f"{root / MANIFEST}: files entry"
    if not isinstance(rows, list):
        raise ManifestError(f"{root / MANIFEST}: no files table; re-convert")
    out = []
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("sha256"), str):
            raise ManifestError(f"{where} {row!r} is malformed; re-convert")
        if not isinstance(row.get("size"), int) or isinstance(row.get("size"), bool):
            raise ManifestError(f"{where} {row.get('path')!r} has no integer size; re-convert")
        try:
            out.append((row, inside(root, row.get("path"), where)))  # type: ignore[arg-type]
        except ContainmentError as e:
            raise ManifestError(str(e)) from None
    return out


def verify(root: Path, data: dict[str, Any]) -> None:
    """Raise ManifestError naming the first file that is missing or differs from the manifest."""
    for row, path in listed_files(root, data):
        if not path.is_file():
            raise ManifestError(f"{path}: listed in {MANIFEST} but missing")
        if path.stat().st_size != row["size"] or sha256_file(path) != row["sha256"]:
            raise ManifestError(f"{path}: differs from {MANIFEST} (sha256 mismatch)")
