"""Generated images (and videos, audio) kept on disk, one file per generation.

A generation is identified by the pipeline (its identity string: whose weights, which runtime),
the prompt, the seed, the call settings and the device it ran on, so evaluating a second format
of the same source reuses the bf16 images, and an interrupted evaluation keeps every image it
finished (each is written to a temporary file and renamed into place).

Files are safetensors: ``frames`` (uint8, frames × 3 × H × W; one frame for an image) and, for
audio-video pipelines, ``audio`` (float32, channels × samples).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ENV = "QCONVERT_CACHE"
Decode = Callable[[dict[str, torch.Tensor], dict[str, str]], Any]  # (tensors, metadata) -> value


def default_root() -> Path:
    """``$QCONVERT_CACHE``, else ``$XDG_CACHE_HOME/qconvert``, else ``~/.cache/qconvert``."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qconvert"


@dataclass
class Sample:
    """One generation: uint8 frames, optional audio, and how long it took."""

    frames: torch.Tensor  # uint8 [F, 3, H, W]
    audio: torch.Tensor | None = None  # float32 [C, N]
    seconds: float = 0.0
    non_finite: int = 0  # pixels the pipeline returned as NaN/Inf (stored as 0)

    @classmethod
    def from_output(cls, output: Any, seconds: float) -> Sample:
        """From a diffusers pipeline output made with ``output_type="pt"``, batch 1."""
        if hasattr(output, "frames"):
            pixels = output.frames[0]  # [F, 3, H, W]
        else:
            pixels = output.images[0][None]  # [1, 3, H, W]
        pixels = pixels.detach().float().cpu()
        bad = int((~torch.isfinite(pixels)).sum())
        frames = (torch.nan_to_num(pixels, 0.0).clamp(0, 1) * 255).round().to(torch.uint8)
        audio = getattr(output, "audio", None)
        if audio is not None:
            audio = torch.nan_to_num(audio[0].detach().float().cpu(), 0.0).contiguous()
        return cls(frames.contiguous(), audio, seconds, bad)


def key(identity: str, prompt: str, seed: int, settings: dict[str, Any], device: str) -> str:
    """The cache key of one generation (sha256 hex)."""
    blob = json.dumps(
        {"pipeline": identity, "prompt": prompt, "seed": seed, "settings": settings, "on": device},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _pack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON description of a nested value whose tensors go into ``tensors``."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": {str(k): _pack(v, tensors) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"tuple" if isinstance(value, tuple) else "list": [_pack(v, tensors) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(f"cannot store a {type(value).__name__} in the generation cache")


def _unpack(spec: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    if "dict" in spec:
        return {k: _unpack(v, tensors) for k, v in spec["dict"].items()}
    if "list" in spec:
        return [_unpack(v, tensors) for v in spec["list"]]
    if "tuple" in spec:
        return tuple(_unpack(v, tensors) for v in spec["tuple"])
    return spec["value"]


class GenerationCache:
    """``root/generations/<key[:2]>/<key>.safetensors``: a Sample (``get``/``put``), or a
    nested value of tensors and scalars such as a transformer's inputs and output
    (``get_object``/``put_object``)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "generations"

    def _path(self, k: str) -> Path:
        return self.root / k[:2] / f"{k}.safetensors"

    def _read(self, k: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """An entry's tensors and metadata; None when absent. A damaged entry is removed (this
        cache's own file) and so regenerated."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        path = self._path(k)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                return tensors, f.metadata() or {}
        except (OSError, ValueError, SafetensorError):
            path.unlink(missing_ok=True)
            return None

    def _write(self, k: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Write an entry to a temporary file, then rename it into place."""
        from safetensors.torch import save_file

        path = self._path(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)

    def _decoded(self, k: str, decode: Decode) -> Any:
        """``decode(tensors, metadata)`` of an entry; None when absent or when it is not what
        ``decode`` expects (dropped: this cache's own file, regenerated)."""
        entry = self._read(k)
        if entry is None:
            return None
        try:
            return decode(*entry)
        except (KeyError, ValueError, TypeError):
            self._path(k).unlink(missing_ok=True)
            return None

    def get(self, k: str) -> Sample | None:
        return self._decoded(
            k,
            lambda tensors, meta: Sample(
                tensors["frames"],
                tensors.get("audio"),
                float(meta.get("seconds", 0.0)),
                int(meta.get("non_finite", 0)),
            ),
        )

    def put(self, k: str, sample: Sample, about: dict[str, Any]) -> None:
        tensors = {"frames": sample.frames}
        if sample.audio is not None:
            tensors["audio"] = sample.audio
        meta = {
            "seconds": repr(sample.seconds),
            "non_finite": str(sample.non_finite),
            "about": json.dumps(about, sort_keys=True),
        }
        self._write(k, tensors, meta)

    def get_object(self, k: str) -> Any | None:
        return self._decoded(k, lambda tensors, meta: _unpack(json.loads(meta["object"]), tensors))

    def put_object(self, k: str, value: Any) -> None:
        tensors: dict[str, torch.Tensor] = {}
        spec = _pack(value, tensors)
        self._write(k, tensors, {"object": json.dumps(spec)})
