"""One FLUX.1-dev transformer step at 1024² on the GPU, per runtime path, side by side in one
process: a thin layer over ``qconvert.evaluate`` (the real-shape transformer with random
weights, in-memory quantization with the FLUX recipe's plan, the step inputs captured from the
real-shape pipeline, the timers), kept for the comparisons ``qconvert bench`` does not make.

For bf16 against our formats, step and end to end, use the command instead:

    qconvert bench flux --real-shape --format nvfp4,mxfp8,fp8 --compile --batch 1,4

Paths here:
- ``bf16``; ``nvfp4`` / ``mxfp8`` / ``fp8``: our checkpoints' tensors, run by
  ``qconvert.loaders`` as after loading.
- ``nvfp4-all`` / ``mxfp8-all`` / ``fp8-all``: the same with every single block's ``proj_out``
  quantized too (a one-rule recipe; the seed recipe keeps those 38 layers in bf16).
- ``fp8-mslk``: ``fp8`` with every GEMM through mslk's ``f8f8bf16_rowwise``
  (``QCONVERT_FP8_GEMM=mslk``; needs mslk).
- ``torchao-fp8`` / ``torchao-nvfp4-wo``: torchao's own options, ``quantize_`` on load.

Per path: weight GiB, eager / CUDA-graph / compiled (``compile_repeated_blocks(fullgraph=True)``)
/ compiled + CUDA-graph step ms (median), ratios to bf16, peak GiB, and with ``--profile`` the
compiled step's GPU time per kernel kind. GPU only.

    python benchmarks/flux_step.py --batch 1 --compile --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qconvert.evaluate import bench, realshape
from qconvert.evaluate.pipelines import call_kwargs, capture_inputs, release
from qconvert.evaluate.settings import defaults

DEFAULT_PATHS = [
    "bf16", "nvfp4", "mxfp8", "fp8", "nvfp4-all", "mxfp8-all", "fp8-all",
    "torchao-fp8", "torchao-nvfp4-wo",
]  # fmt: skip
SINGLE_PROJ_OUT = r"re:^single_transformer_blocks\.\d+\.proj_out$"
CUDA = torch.device("cuda")


def step_inputs(batch: int) -> dict:
    """The transformer's first-step inputs of the real-shape FLUX pipeline at 1024²."""
    subject = realshape.RealShapeSubject("flux", ["fp8"])
    pipe = subject.load(None, CUDA)
    settings = defaults("flux")
    try:
        return capture_inputs(pipe, call_kwargs(subject, settings, "a photo", 0, CUDA, batch))
    finally:
        del pipe
        release()


def build(name: str, rec: object) -> tuple[torch.nn.Module, dict]:
    model = realshape.build_transformer(rec, CUDA, seed=0)
    if name == "bf16":
        return model, {}
    if name.startswith("torchao-"):
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )

        if name == "torchao-fp8":
            quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        else:
            from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

            quantize_(model, NVFP4WeightOnlyConfig())
        return model, {}
    from qconvert.convert.plan import Selection
    from qconvert.convert.recipes import Rule, UserRecipe

    fmt = name.removesuffix("-all").removesuffix("-mslk")
    selection = Selection()
    if name.endswith("-all"):
        rule = Rule(SINGLE_PROJ_OUT, "benchmark: single-block proj_out quantized", fmt)
        selection = Selection(user=UserRecipe("<flux_step.py>", (rule,)))
    runtime, _ = realshape.quantize_in_memory(model, rec, fmt, CUDA, selection)
    return model, {"runtime": runtime}


KINDS = [
    ("qconvert dequant", ("_dequant_kernel",)),
    ("qconvert act quant", ("_quantize_rows_kernel",)),
    ("qconvert fused gemm", ("_fused_linear_kernel",)),
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "f8f8bf16", "sm90_")),
    ("triton (inductor)", ("triton_",)),
]


def profile_kinds(fn: Callable[[], object]) -> dict:
    """GPU ms per kernel kind over one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    top: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = evt.device_time / 1e3
        kind = next((k for k, keys in KINDS if any(s in evt.name.lower() for s in keys)), "other")
        out[kind] = out.get(kind, 0.0) + ms
        top[evt.name[:90]] = top.get(evt.name[:90], 0.0) + ms
    result: dict = {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}
    result["total"] = round(sum(out.values()), 2)
    result["top"] = {k: round(v, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]}
    return result


def ms(stats: dict) -> float:
    return round(stats["median_s"] * 1000, 2)


def measure(name: str, x: dict, args: argparse.Namespace, rec: object) -> dict:
    from qconvert.loaders import fp8

    torch._dynamo.reset()
    t = time.perf_counter()
    model, row = build(name, rec)
    row = {"path": name, "fp8_gemm": fp8.gemm_backend(), **row}
    row["build_s"] = round(time.perf_counter() - t, 1)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        time_model(model, name, x, args, row)
    finally:
        del model
        release()
    return row


def time_model(
    model: torch.nn.Module, name: str, x: dict, args: argparse.Namespace, row: dict
) -> None:
    row["weight_gib"] = round(bench.weight_bytes(model) / 2**30, 3)
    reps = args.reps
    row["eager_ms"] = ms(bench.timed(lambda: model(**x), 1, reps, CUDA))
    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    try:
        row["graph_ms"] = ms(bench.graph_timed(model, x, reps * 2))
    except Exception as e:
        row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if not args.compile:
        return
    t = time.perf_counter()
    model.compile_repeated_blocks(fullgraph=True)
    with torch.inference_mode():
        model(**x)
    row["compile_s"] = round(time.perf_counter() - t, 1)
    row["compiled_ms"] = ms(bench.timed(lambda: model(**x), 1, reps * 2, CUDA))
    if name in args.profile:
        with torch.inference_mode():
            row["compiled_profile_ms"] = profile_kinds(lambda: model(**x))
    try:
        row["compiled_graph_ms"] = ms(bench.graph_timed(model, x, reps * 2))
    except Exception as e:
        row["compiled_graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"


def run_path(name: str, x: dict, args: argparse.Namespace, rec: object) -> dict:
    if not name.endswith("-mslk"):
        return measure(name, x, args, rec)
    os.environ["QCONVERT_FP8_GEMM"] = "mslk"  # every FP8 GEMM through mslk, build and run
    try:
        return measure(name, x, args, rec)
    finally:
        os.environ.pop("QCONVERT_FP8_GEMM", None)


def meta(batch: int) -> dict:
    from qconvert.evaluate.report import versions

    return {
        "gpu": torch.cuda.get_device_name(), **versions(), "batch": batch,
        "resolution": "1024x1024 (4096 image + 512 text tokens)",
        "inputs": "captured from the real-shape FLUX pipeline's first step",
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r["path"] == "bf16"), None)
    for r in rows:
        for key in ("eager_ms", "graph_ms", "compiled_ms", "compiled_graph_ms", "weight_gib"):
            if base and key in r and key in base:
                r[f"{key}_x_bf16"] = round(r[key] / base[key], 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--reps", type=int, default=5, help="eager reps (graph/compiled: twice)")
    ap.add_argument("--paths", nargs="+", default=DEFAULT_PATHS)
    ap.add_argument("--profile", nargs="*", default=[], help="paths to profile (compiled)")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    rec = realshape.recipe("flux")
    x = step_inputs(args.batch)
    info = meta(args.batch)
    rows: list[dict] = []
    for name in args.paths:
        try:
            row = run_path(name, x, args, rec)
        except Exception as e:  # one path failing must not lose the others' numbers
            row = {"path": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            release()
        rows.append(row)
        print(json.dumps(row), flush=True)
        ratios(rows)
        if args.json:  # after every path: a run cut short keeps what it measured
            args.json.write_text(json.dumps({"meta": info, "rows": rows}, indent=2))
    print(json.dumps({"meta": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
