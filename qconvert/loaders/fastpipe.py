"""Where ``load_transformer`` / ``load_pipeline`` take the fast path, and how a pipeline is put
together around it.

- A Hub repo id is first brought into the local Hugging Face cache with huggingface_hub's
  ``snapshot_download`` (parallel files; Xet where ``hf_xet`` is installed), only what the load
  needs; then it loads like a local folder.
- ``load_pipeline``: the transformer's skeleton is built first; then its weights stream in
  (``FastLoad.finish``, this thread) while one other thread loads the other components with
  diffusers (``DiffusionPipeline.from_pretrained`` handed the transformer object, so diffusers
  itself assembles the pipeline class from model_index.json). Only one thread ever constructs
  modules at a time: diffusers switches torch's default dtype and patches
  ``register_parameter`` while it builds a model, and ``finish`` uses neither.
- Anything else returns None after one log line saying why; the caller then takes the
  compatibility path (plain diffusers + ``runtime.prepare``). ``QCONVERT_FAST_LOAD=0`` sends
  every load that way.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from qconvert.loaders.fastload import INDEX, FastLoad, Unsupported
from qconvert.manifest import MANIFEST

log = logging.getLogger("qconvert.loaders")
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")
FAST_KWARGS = {"dtype", *HUB_KWARGS}
TRANSFORMER = "transformer"


def _fallback(what: str | Path, why: str) -> None:
    log.warning("qconvert: loading %s through diffusers (compatibility path): %s", what, why)


def _unknown_kwargs(kwargs: dict[str, Any]) -> str | None:
    if os.environ.get("QCONVERT_FAST_LOAD", "1") == "0":
        return "QCONVERT_FAST_LOAD=0"
    extra = sorted(set(kwargs) - FAST_KWARGS)
    return f"the fast path does not take {', '.join(extra)}" if extra else None


def _hub(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}


def _snapshot(repo_id: str, patterns: list[str], kwargs: dict[str, Any]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=patterns, **_hub(kwargs)))


def _device_map(dev: torch.device) -> dict[str, torch.device] | None:
    """What ``from_pretrained(device_map=str(dev))`` turns a CUDA device into."""
    return {"": torch.device(str(dev))} if dev.type == "cuda" else None


def transformer(
    path_or_repo: str | Path, dev: torch.device, subfolder: str | None, kwargs: dict[str, Any]
) -> Any | None:
    """The transformer through the fast path, or None (logged) for the compatibility path."""
    why = _unknown_kwargs(kwargs)
    if why:
        _fallback(path_or_repo, why)
        return None
    root = Path(str(path_or_repo))
    if not root.is_dir():  # a Hub repo id: the small files first, then the weights it needs
        root = _snapshot(
            str(path_or_repo), [MANIFEST, "config.json", f"{subfolder or TRANSFORMER}/config.json"],
            kwargs,
        )  # fmt: skip
        if not (root / MANIFEST).is_file():
            _fallback(path_or_repo, f"no {MANIFEST}: not a qconvert output")
            return None
    if subfolder is None and not (root / "config.json").is_file():
        subfolder = TRANSFORMER
    if root != Path(str(path_or_repo)):
        prefix = f"{subfolder}/" if subfolder else ""
        weights = [f"{prefix}diffusion_pytorch_model*.safetensors", f"{prefix}{INDEX}"]
        root = _snapshot(str(path_or_repo), weights, {**kwargs, "revision": root.name})
    load_id = {
        "pretrained_model_name_or_path": str(path_or_repo),
        "subfolder": subfolder,
        "revision": kwargs.get("revision"),
    }
    fast = FastLoad(
        root / subfolder if subfolder else root,
        root,
        dev,
        str(path_or_repo),
        dtype=kwargs.get("dtype", torch.bfloat16),
        device_map=_device_map(dev),
        load_id=load_id,
    )
    try:
        fast.begin()
    except Unsupported as exc:
        _fallback(path_or_repo, str(exc))
        return None
    return fast.finish()


def _components(
    folder: str, model: Any, dev: torch.device, dtype: torch.dtype
) -> Any:  # runs in the components thread
    from diffusers import DiffusionPipeline

    # Straight to the GPU where diffusers can (its pipeline device_map takes "cuda", no index).
    device_map = "cuda" if str(dev) == "cuda" else None
    pipe = DiffusionPipeline.from_pretrained(
        folder, transformer=model, dtype=dtype, device_map=device_map
    )
    if device_map is None:
        for name, part in pipe.components.items():
            if name != TRANSFORMER and isinstance(part, torch.nn.Module):
                part.to(dev)
    return pipe


def pipeline(path_or_repo: str | Path, dev: torch.device, kwargs: dict[str, Any]) -> Any | None:
    """The pipeline with its transformer through the fast path, or None (logged)."""
    import json

    from diffusers import DiffusionPipeline

    why = _unknown_kwargs(kwargs)
    if why:
        _fallback(path_or_repo, why)
        return None
    root = where = Path(str(path_or_repo))
    if not root.is_dir():  # what DiffusionPipeline.from_pretrained itself would download
        root = Path(DiffusionPipeline.download(str(path_or_repo), **_hub(kwargs)))
    folder = str(path_or_repo) if root == where else str(root)  # as diffusers would name it
    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
        library = index[TRANSFORMER][0]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        _fallback(path_or_repo, "no diffusers transformer in model_index.json")
        return None
    if library != "diffusers":
        _fallback(path_or_repo, f"the transformer is a {library} model")
        return None
    dtype = kwargs.get("dtype", torch.bfloat16)
    fast = FastLoad(root / TRANSFORMER, root, dev, os.path.join(folder, TRANSFORMER), dtype)
    try:
        model = fast.begin()
    except Unsupported as exc:
        _fallback(path_or_repo, str(exc))
        return None
    with ThreadPoolExecutor(1, thread_name_prefix="qconvert-components") as pool:
        others = pool.submit(_components, folder, model, dev, dtype)
        try:
            fast.finish()
        except BaseException:
            others.exception()  # let it end; the first error is the one to see
            raise
        pipe = others.result()
    pipe.register_to_config(_name_or_path=str(path_or_repo))
    return pipe
