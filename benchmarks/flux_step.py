"""One FLUX.1-dev transformer step at 1024² on the GPU, per runtime path, side by side in one
process. Real config, random weights (speed depends on shapes, not values).

Paths:
- ``bf16``: the plain model.
- ``nvfp4`` / ``mxfp8`` / ``fp8``: our checkpoints' tensors (built in memory with
  ``qconvert.formats``, the FLUX recipe's layer choice) run by ``qconvert.loaders.runtime`` as
  after loading: Hopper dequant kernels + cuBLAS (nvfp4, mxfp8), per-token FP8 + rowwise FP8
  GEMM (fp8).
- ``nvfp4-all`` / ``mxfp8-all`` / ``fp8-all``: the same with every single block's
  ``proj_out`` quantized too (a one-rule recipe file; the seed recipe keeps those 38 layers,
  15 % of the parameters, in bf16).
- ``fp8-mslk``: ``fp8`` with every GEMM through mslk's ``f8f8bf16_rowwise``
  (``QCONVERT_FP8_GEMM=mslk``; needs mslk).
- ``torchao-fp8``: torchao's Hopper option as users apply it: ``quantize_(transformer,
  Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))`` on load.
- ``torchao-nvfp4-wo``: ``quantize_(transformer, NVFP4WeightOnlyConfig())`` on load.

Reports per path: weight GiB, eager / CUDA-graph / compiled (``compile_repeated_blocks(
fullgraph=True)``) / compiled + CUDA-graph step ms (median), ratios to bf16, peak GiB, and with
``--profile`` the compiled step's GPU time per kernel kind. GPU only.

    python benchmarks/flux_step.py --batch 1 --compile --json out.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

OURS = ("nvfp4", "mxfp8", "fp8")
DEFAULT_PATHS = [
    "bf16", "nvfp4", "mxfp8", "fp8", "nvfp4-all", "mxfp8-all", "fp8-all",
    "torchao-fp8", "torchao-nvfp4-wo",
]  # fmt: skip
SINGLE_PROJ_OUT = r"re:^single_transformer_blocks\.\d+\.proj_out$"


def inputs(batch: int, device: str = "cuda") -> dict[str, torch.Tensor | bool]:
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)

    return {
        "hidden_states": randn(batch, 4096, 64),
        "encoder_hidden_states": randn(batch, 512, 4096),
        "pooled_projections": randn(batch, 768),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=torch.bfloat16),
        "img_ids": torch.zeros(4096, 3, device=device),
        "txt_ids": torch.zeros(512, 3, device=device),
        "guidance": torch.full((batch,), 3.5, device=device, dtype=torch.bfloat16),
        "return_dict": False,
    }


def time_ms(fn: Callable[[], object], reps: int) -> float:
    """Median GPU ms of ``fn`` (CUDA events; one warm call first)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(model: torch.nn.Module, x: dict, reps: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            model(**x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        model(**x)
    ms = time_ms(graph.replay, reps=reps)
    del graph
    return ms


def weight_gib(model: torch.nn.Module) -> float:
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        inner = t.data if isinstance(t, torch.nn.Parameter) else t
        names = getattr(inner, "tensor_data_names", None)
        if names:
            for n in [*names, *getattr(inner, "optional_tensor_data_names", [])]:
                part = getattr(inner, n, None)
                if part is not None:
                    total += part.numel() * part.element_size()
        else:
            total += inner.numel() * inner.element_size()
    return total / 2**30


def ours(base: torch.nn.Module, fmt: str, all_blocks: bool) -> tuple[torch.nn.Module, dict]:
    """Our checkpoint's tensors for the FLUX recipe (optionally + single-block proj_out),
    prepared for this GPU by qconvert.loaders.runtime."""
    from qconvert.convert import families, plan_for
    from qconvert.convert.plan import Selection, real_config_source
    from qconvert.convert.recipes import Rule, UserRecipe
    from qconvert.formats import FORMATS
    from qconvert.loaders.runtime import prepare

    user = None
    if all_blocks:
        rule = Rule(SINGLE_PROJ_OUT, "benchmark: single-block proj_out quantized", fmt)
        user = UserRecipe("<flux_step.py>", (rule,))
    source = real_config_source(families()["flux"])
    plan = plan_for(source, "flux", FORMATS[fmt], Selection(user=user))
    decided = {layer.name: layer.action for layer in plan.layers}
    q = copy.deepcopy(base)
    for name, module in q.named_modules():
        if isinstance(module, torch.nn.Linear) and decided.get(name, "keep") != "keep":
            w = FORMATS[decided[name]].quantize(module.weight.data, name=name)
            module.weight = torch.nn.Parameter(w, requires_grad=False)
    chosen = prepare(q, torch.device("cuda"))
    return q, chosen


def torchao_on_load(base: torch.nn.Module, which: str) -> torch.nn.Module:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    q = copy.deepcopy(base)
    if which == "torchao-fp8":
        quantize_(q, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    else:
        from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

        quantize_(q, NVFP4WeightOnlyConfig())
    return q


KINDS = [
    ("qconvert dequant", ("_dequant_kernel",)),
    ("qconvert act quant", ("_quantize_rows_kernel",)),
    ("qconvert fused gemm", ("_fused_linear_kernel",)),
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "f8f8bf16", "sm90_")),
    ("triton (inductor)", ("triton_",)),
]


def profile_kinds(fn: Callable[[], object]) -> dict[str, float]:
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
        name = evt.name
        kind = next((k for k, keys in KINDS if any(s in name.lower() for s in keys)), "other")
        out[kind] = out.get(kind, 0.0) + ms
        top[name[:90]] = top.get(name[:90], 0.0) + ms
    result = {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}
    result["total"] = round(sum(out.values()), 2)
    result["top"] = {k: round(v, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]}
    return result


def run_path(name: str, base: torch.nn.Module, x: dict, args: argparse.Namespace) -> dict:
    if not name.endswith("-mslk"):
        return build_and_measure(name, base, x, args)
    os.environ["QCONVERT_FP8_GEMM"] = "mslk"  # every FP8 GEMM through mslk, build and run
    try:
        return build_and_measure(name, base, x, args)
    finally:
        os.environ.pop("QCONVERT_FP8_GEMM", None)


def build_and_measure(
    name: str, base: torch.nn.Module, x: dict, args: argparse.Namespace
) -> dict:
    from qconvert.loaders import fp8

    torch._dynamo.reset()
    resident = torch.cuda.memory_allocated()  # the bf16 base every path is built from
    t = time.perf_counter()
    row: dict = {"path": name, "fp8_gemm": fp8.gemm_backend()}
    if name == "bf16":
        model = copy.deepcopy(base)
    elif name.startswith("torchao-"):
        model = torchao_on_load(base, name)
    else:
        fmt = name.removesuffix("-all").removesuffix("-mslk")
        model, row["runtime"] = ours(base, fmt, all_blocks=name.endswith("-all"))
    row["build_s"] = round(time.perf_counter() - t, 1)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    measure(name, model, x, args, row, resident)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return row


def measure(
    name: str, model: torch.nn.Module, x: dict, args: argparse.Namespace, row: dict, resident: int
) -> None:
    row["weight_gib"] = round(weight_gib(model), 3)
    with torch.inference_mode():
        row["eager_ms"] = round(time_ms(lambda: model(**x), reps=args.reps), 2)
    # GPU memory of this path while it runs (weights + activations; the shared base excluded).
    row["peak_gib"] = round((torch.cuda.max_memory_allocated() - resident) / 2**30, 2)
    try:
        row["graph_ms"] = round(graph_ms(model, x, reps=args.reps * 2), 2)
    except Exception as e:
        row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if args.compile:
        t = time.perf_counter()
        model.compile_repeated_blocks(fullgraph=True)
        with torch.inference_mode():
            model(**x)
        row["compile_s"] = round(time.perf_counter() - t, 1)
        with torch.inference_mode():
            row["compiled_ms"] = round(time_ms(lambda: model(**x), reps=args.reps * 2), 2)
            if name in args.profile:
                row["compiled_profile_ms"] = profile_kinds(lambda: model(**x))
        try:
            row["compiled_graph_ms"] = round(graph_ms(model, x, reps=args.reps * 2), 2)
        except Exception as e:
            row["compiled_graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"


def meta(batch: int) -> dict:
    import diffusers
    import torchao
    import triton

    return {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "torchao": torchao.__version__, "diffusers": diffusers.__version__,
        "triton": triton.__version__, "batch": batch,
        "resolution": "1024x1024 (4096 image + 512 text tokens)",
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def ratios(rows: list[dict]) -> None:
    bf16 = next((r for r in rows if r["path"] == "bf16"), None)
    for r in rows:
        for key in ("eager_ms", "graph_ms", "compiled_ms", "compiled_graph_ms", "weight_gib"):
            if bf16 and key in r and key in bf16:
                r[f"{key}_x_bf16"] = round(r[key] / bf16[key], 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--reps", type=int, default=5, help="eager reps (graph/compiled: twice)")
    ap.add_argument("--paths", nargs="+", default=DEFAULT_PATHS)
    ap.add_argument("--profile", nargs="*", default=[], help="paths to profile (compiled)")
    args = ap.parse_args()
    from diffusers import FluxTransformer2DModel

    torch._dynamo.config.cache_size_limit = 64
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        base = FluxTransformer2DModel(guidance_embeds=True).eval()
    torch.set_default_dtype(torch.float32)
    x = inputs(args.batch)
    info = meta(args.batch)
    rows: list[dict] = []
    for name in args.paths:
        try:
            row = run_path(name, base, x, args)
        except Exception as e:  # one path failing must not lose the others' numbers
            row = {"path": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        ratios(rows)
        if args.json:  # after every path: a run cut short keeps what it measured
            args.json.write_text(json.dumps({"meta": info, "rows": rows}, indent=2))
    print(json.dumps({"meta": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
