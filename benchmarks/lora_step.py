"""One FLUX.1-dev transformer step at 1024² (compiled, ``compile_repeated_blocks(fullgraph=True)``)
with and without a LoRA, per runtime path, on the GPU. Real config, random weights.

Paths: ``bf16`` and our ``nvfp4`` / ``mxfp8`` / ``fp8`` tensors prepared for this GPU by
``qconvert.loaders.runtime`` (built as in ``flux_step.py``). The LoRA: r=16 on ``to_q``,
``to_k``, ``to_v``, ``to_out.0`` and ``proj_mlp`` of every block (random A and B), injected by
PEFT the way diffusers' ``load_lora_adapter`` does (``TorchaoLoraLinear`` around our modules);
``fp8-lora-no-qkv`` puts it on ``to_out.0`` / ``proj_mlp`` only, so the fp8 path keeps its fused
q/k/v GEMM. Per path: eager and compiled ms with and without the LoRA, the LoRA's cost, compile
seconds, and the compiled LoRA output against eager (relative L2). Under 5 minutes on an H100.

    python benchmarks/lora_step.py --json benchmarks/results/lora_step_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_step import CUDA, build, meta, ms, step_inputs

from qconvert.evaluate import bench, realshape

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]
PATHS = ["bf16", "nvfp4", "fp8", "mxfp8", "fp8-lora-no-qkv"]  # most wanted first


def add_lora(model: torch.nn.Module, targets: list[str], rank: int) -> int:
    """A random LoRA of ``rank`` on ``targets`` (PEFT, as diffusers injects one); returns how
    many layers it wraps."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    g = torch.Generator("cuda").manual_seed(1)
    n = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            std = 0.5 / p.shape[1] ** 0.5
            p.data = torch.randn(p.shape, generator=g, device="cuda", dtype=p.dtype) * std
            n += "lora_A" in name
    return n


def time_ms(fn: Callable[[], object], reps: int) -> float:
    return ms(bench.timed(fn, 1, reps, CUDA))


def compiled_ms(model: torch.nn.Module, x: dict, reps: int) -> tuple[float, float]:
    """(compile + first call seconds, median compiled ms)."""
    t = time.perf_counter()
    with torch.inference_mode():
        model(**x)
        torch.cuda.synchronize()
    first = time.perf_counter() - t
    with torch.inference_mode():
        return round(first, 1), round(time_ms(lambda: model(**x), reps=reps), 2)


def run(name: str, rec: object, x: dict, args: argparse.Namespace) -> dict:
    torch._dynamo.reset()
    row: dict = {"path": name}
    model, extra = build(name.split("-")[0], rec)  # the FLUX recipe's plan, as converted
    row.update(extra)
    row["weight_gib"] = round(bench.weight_bytes(model) / 2**30, 3)
    with torch.inference_mode():
        row["eager_ms"] = round(time_ms(lambda: model(**x), reps=args.reps), 2)
    model.compile_repeated_blocks(fullgraph=True)
    row["compile_s"], row["compiled_ms"] = compiled_ms(model, x, args.reps * 2)
    targets = ["to_out.0", "proj_mlp"] if name.endswith("-no-qkv") else TARGETS
    row["lora_layers"] = add_lora(model, targets, args.rank)
    row["lora_targets"] = targets
    with torch.compiler.set_stance("force_eager"), torch.inference_mode():  # blocks compiled
        row["eager_lora_ms"] = round(time_ms(lambda: model(**x), reps=args.reps), 2)
        eager_out = model(**x)[0].float()
    attn = model.transformer_blocks[0].attn
    row["fused_qkv_with_lora"] = bool(getattr(attn, "fused_projections", False))
    row["compile_lora_s"], row["compiled_lora_ms"] = compiled_ms(model, x, args.reps * 2)
    with torch.inference_mode():
        out = model(**x)[0].float()
    row["compiled_vs_eager_rel"] = float((out - eager_out).norm() / eager_out.norm())
    row["lora_cost_x"] = round(row["compiled_lora_ms"] / row["compiled_ms"], 3)
    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="eager reps (compiled: twice)")
    ap.add_argument("--paths", nargs="+", default=PATHS)
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    rec = realshape.recipe("flux")
    x = step_inputs(args.batch)
    info = {**meta(args.batch), "lora_rank": args.rank}
    rows: list[dict] = []
    start = time.perf_counter()
    for name in args.paths:
        try:
            row = run(name, rec, x, args)
        except Exception as e:  # one path failing must not lose the others' numbers
            row = {"path": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        gc.collect()  # the path's model is gone with run()'s frame
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rows.append(row)
        print(json.dumps(row), flush=True)
        bf16 = next((r for r in rows if r["path"] == "bf16" and "compiled_ms" in r), None)
        for r in rows:
            if bf16 and "compiled_lora_ms" in r:
                r["compiled_lora_x_bf16_lora"] = round(
                    r["compiled_lora_ms"] / bf16["compiled_lora_ms"], 3
                )
        info["elapsed_s"] = round(time.perf_counter() - start, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": info, "rows": rows}, indent=2))
    print(json.dumps({"meta": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
