"""Builders for the hostile-input tests (tests/test_safety.py, tests/test_fuzz.py): small FLUX
pipeline folders whose weights are sparse files (a real safetensors header, zero bytes that cost
no disk), a Hugging Face cache layout with snapshot → blob links, and a recorder of every file
the process opens (an audit hook), to prove nothing outside a root is read."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from qconvert.safetensors_io import layout

# A FluxTransformer2DModel that builds on the meta device in milliseconds.
SMALL = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": [8, 12, 12],
}
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def specs_for(config: dict[str, object]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    return {n: (torch.bfloat16, tuple(t.shape)) for n, t in model.state_dict().items()}


def write_sparse(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
    """A valid safetensors file with these tensors (all zero bytes, sparse on disk)."""
    head, _, size = layout(specs, {"format": "pt"})
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)


def write_raw(path: Path, header: object, data_size: int, raw: bytes | None = None) -> None:
    """A file with this JSON header (or ``raw`` header bytes) and ``data_size`` zero bytes."""
    body = raw if raw is not None else json.dumps(header).encode()
    with path.open("wb") as f:
        f.write(len(body).to_bytes(8, "little") + body)
        f.truncate(8 + len(body) + data_size)


def sparse_pipeline(
    dst: Path,
    config: dict[str, object] | None = None,
    shards: int = 2,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """A FLUX pipeline folder: model_index.json, transformer/ (config, ``shards`` sparse
    safetensors files and their index; ``shapes`` overrides some tensors' shapes), vae/ (a
    config and a small file), and a LICENSE. Returns ``dst``."""
    config = {**SMALL, **(config or {})}
    specs = specs_for(config)
    for name, shape in (shapes or {}).items():
        specs[name] = (torch.bfloat16, shape)
    tdir = dst / "transformer"
    tdir.mkdir(parents=True)
    (tdir / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1",
                    **config})
    )
    names = sorted(specs)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_sparse(tdir / file, {n: specs[n] for n in part})
        weight_map.update(dict.fromkeys(part, file))
    (tdir / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "vae").mkdir()
    (dst / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (dst / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae weights")
    (dst / "LICENSE.md").write_text("test license\n")
    model_index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (dst / "model_index.json").write_text(json.dumps(model_index))
    return dst


def secret_file(where: Path) -> Path:
    """A user's file outside every source: a safetensors file whose tensors an attacker would
    like published (named like FLUX tensors, so a conversion would take them)."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / "secret.safetensors"
    write_sparse(path, {"x_embedder.weight": (torch.bfloat16, (64, 16))})
    (where / "shadow").write_text("root:secret\n")
    return path


def as_hub_cache(src: Path, cache: Path, repo: str = "org/name") -> Path:
    """``src`` laid out as huggingface_hub's cache does: blobs/ by content hash, and a
    snapshots/<commit>/ tree of relative links to them. Returns the snapshot folder."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(str(src).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = repo_dir / "blobs" / digest
        if not blob.exists():
            blob.write_bytes(path.read_bytes())
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


_OPENED: list[str] = []
_RECORDING = threading.Event()


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _RECORDING.is_set() and event == "open" and args and isinstance(args[0], str | bytes):
        _OPENED.append(os.fsdecode(args[0]))  # type: ignore[arg-type]


sys.addaudithook(_audit)


@contextlib.contextmanager
def opened_files() -> Iterator[list[str]]:
    """Every path this process opens inside the block (resolved), in order."""
    _OPENED.clear()
    found: list[str] = []
    _RECORDING.set()
    try:
        yield found
    finally:
        _RECORDING.clear()
        found += [str(Path(p).resolve()) for p in _OPENED]
        _OPENED.clear()
