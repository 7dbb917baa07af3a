"""A FLUX-shaped bf16 source of any depth and width, written tensor by tensor (bounded
memory): for tests and benchmarks (conversion speed depends on shapes, not values)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_flux_source(
    dst: Path,
    num_layers: int,
    num_single_layers: int,
    width_heads: int = 8,
    shard_bytes: int = 200 * 10**6,
    seed: int = 0,
    real_config: dict[str, object] | None = None,
    device: str = "cpu",
) -> int:
    """A diffusers pipeline folder whose FluxTransformer2DModel has the given depth (the tiny
    1024-wide config, or ``real_config``, e.g. the flux recipe's FLUX.1-dev config); returns
    its bytes."""
    from diffusers import FluxTransformer2DModel

    from qconvert.tiny.flux import TRANSFORMER

    base = real_config or {**TRANSFORMER, "num_attention_heads": width_heads}
    config = {**base, "num_layers": num_layers, "num_single_layers": num_single_layers}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    tdir = dst / "transformer"
    tdir.mkdir(parents=True)
    model.save_config(tdir)
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
    }
    (dst / "model_index.json").write_text(json.dumps(index))
    g = torch.Generator(device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    groups: list[list[str]] = []
    size = total = 0
    for name, meta in sorted(model.state_dict().items()):
        nbytes = meta.numel() * 2
        if shard and size + nbytes > shard_bytes:
            groups.append(_flush(tdir, len(groups), shard))
            size = 0
        t = torch.randn(meta.shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02
        shard[name] = t.cpu()
        size += nbytes
        total += nbytes
    groups.append(_flush(tdir, len(groups), shard))
    weight_map = {}
    for i, names in enumerate(groups):
        final = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        (tdir / f"part{i}").rename(tdir / final)
        weight_map.update(dict.fromkeys(names, final))
    index_path = tdir / "diffusion_pytorch_model.safetensors.index.json"
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _flush(tdir: Path, i: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    save_file(tensors, tdir / f"part{i}", {"format": "pt"})
    names = list(tensors)
    tensors.clear()
    return names
