"""A FLUX-shaped bf16 source of any depth, written tensor by tensor (bounded memory)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qconvert.convert.safetensors_io import write_file


def write_flux_source(
    dst: Path,
    num_layers: int,
    num_single_layers: int,
    width_heads: int = 8,
    shard_bytes: int = 200 * 10**6,
    seed: int = 0,
) -> int:
    """A diffusers pipeline folder whose transformer has the given depth; returns its bytes."""
    from diffusers import FluxTransformer2DModel

    from qconvert.convert.tiny_flux import TRANSFORMER

    config = {
        **TRANSFORMER,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "num_attention_heads": width_heads,
    }
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    tdir = dst / "transformer"
    tdir.mkdir(parents=True)
    model.save_config(tdir)
    (dst / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxPipeline",
                "_diffusers_version": "0.42.1",
                "transformer": ["diffusers", "FluxTransformer2DModel"],
            }
        )
    )
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    names = []
    for name, meta in sorted(model.state_dict().items()):
        nbytes = meta.numel() * 2
        if shards[-1] and size + nbytes > shard_bytes:
            names.append(_flush(tdir, len(names), shards[-1]))
            shards.append({})
            size = 0
        shards[-1][name] = (torch.randn(meta.shape, generator=g) * 0.02).to(torch.bfloat16)
        size += nbytes
        total += nbytes
    names.append(_flush(tdir, len(names), shards[-1]))
    weight_map = {}
    for i, shard_names in enumerate(names):
        final = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        (tdir / f"part{i}").rename(tdir / final)
        weight_map.update(dict.fromkeys(shard_names, final))
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def _flush(tdir: Path, i: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    write_file(tdir / f"part{i}", tensors, {"format": "pt"})
    names = list(tensors)
    tensors.clear()
    return names
