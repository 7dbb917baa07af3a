"""Load qconvert checkpoints into diffusers and pick the kernels this device can run.

qconvert outputs take the fast path (``fastload``: shards read straight to the device, torchao
subclasses built from the shard metadata, each quantized Linear switched to its runtime path
as it arrives; ``fastpipe``: Hub snapshots, the pipeline's other components loaded alongside).
It builds what the compatibility path builds: diffusers' ``from_pretrained`` (which reads the
torchao-flattened safetensors and rebuilds the subclasses; nothing is quantized at load), then
``runtime.prepare``, which points each quantized weight at the path the device runs (see
``runtime.TABLE``). Anything the fast path cannot represent goes that way, logged in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qconvert.loaders import fastpipe
from qconvert.loaders.runtime import TABLE, device_class, prepare
from qconvert.locate import hub_lookup, local_or_repo

__all__ = ["TABLE", "device_class", "load_pipeline", "load_transformer", "prepare"]


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _has_root_config(path_or_repo: str | Path, kwargs: dict[str, Any]) -> bool:
    """Whether a folder or Hub repo is a lone transformer (config.json at its root) rather
    than a pipeline (transformer/config.json)."""
    root = Path(str(path_or_repo))
    if root.exists():
        return (root / "config.json").is_file()
    from huggingface_hub import file_exists

    return file_exists(
        str(path_or_repo),
        "config.json",
        revision=kwargs.get("revision"),
        token=kwargs.get("token"),
    )


def load_pipeline(
    path_or_repo: str | Path, device: str | torch.device | None = "auto", **kwargs: Any
) -> Any:
    """``DiffusionPipeline.from_pretrained`` + device preparation of the quantized weights
    (a qconvert output: the same pipeline, through the fast path)."""
    from diffusers import DiffusionPipeline

    dev = _device(device)
    kwargs.setdefault("dtype", torch.bfloat16)
    where = local_or_repo(path_or_repo)  # "no such folder" before any Hub call
    with hub_lookup(where):
        fast = fastpipe.pipeline(where, dev, kwargs)  # None: not for the fast path (logged)
    if fast is not None:
        return fast
    with hub_lookup(where):
        pipe = DiffusionPipeline.from_pretrained(str(where), **kwargs)
    pipe.to(dev)
    prepare(pipe.transformer, dev)
    return pipe


def load_transformer(
    path_or_repo: str | Path,
    device: str | torch.device | None = "auto",
    subfolder: str | None = None,
    **kwargs: Any,
) -> Any:
    """Load the quantized transformer alone from a folder or Hub repo id: a lone transformer,
    or a pipeline's ``transformer/`` (the default when there is no config.json at the root)."""
    from diffusers import AutoModel

    dev = _device(device)
    kwargs.setdefault("dtype", torch.bfloat16)
    where = local_or_repo(path_or_repo)  # "no such folder" before any Hub call
    with hub_lookup(where):
        fast = fastpipe.transformer(where, dev, subfolder, kwargs)  # None: not for it (logged)
    if fast is not None:
        return fast
    with hub_lookup(where):
        if subfolder is None and not _has_root_config(where, kwargs):
            subfolder = "transformer"
    if dev.type == "cuda":  # straight to the GPU: bf16 weights are never staged on the host
        kwargs.setdefault("device_map", str(dev))
    if subfolder:
        kwargs["subfolder"] = subfolder
    with hub_lookup(where):
        model = AutoModel.from_pretrained(str(where), **kwargs)
    model.to(dev)
    prepare(model, dev)
    return model
