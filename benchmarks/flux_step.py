"""One FLUX.1-dev transformer step at 1024² on the GPU, per runtime path, in one process:
bf16; qconvert's Hopper path for nvfp4 / mxfp8; torchao rowwise FP8; torchao's NVFP4
weight-only (the baseline our Hopper path replaces). Real config, random weights (speed
depends on shapes). Quantized weights are built in memory with qconvert's formats (the bytes
our checkpoints hold) and prepared by qconvert.loaders.runtime exactly as after loading.
Reports eager and CUDA-graph step ms (median), weight GiB, peak GPU GiB. GPU only.

    python benchmarks/flux_step.py --json out.json [--compile]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def inputs(device: str = "cuda") -> dict[str, torch.Tensor]:
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)

    return {
        "hidden_states": randn(1, 4096, 64),
        "encoder_hidden_states": randn(1, 512, 4096),
        "pooled_projections": randn(1, 768),
        "timestep": torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        "img_ids": torch.zeros(4096, 3, device=device),
        "txt_ids": torch.zeros(512, 3, device=device),
        "guidance": torch.tensor([3.5], device=device, dtype=torch.bfloat16),
        "return_dict": False,
    }


def time_ms(fn: Callable[[], object], reps: int = 10) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def graph_ms(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            model(**x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        model(**x)
    return time_ms(graph.replay, reps=20)


def weight_gib(model: torch.nn.Module) -> float:
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        inner = t.data if isinstance(t, torch.nn.Parameter) else t
        names = getattr(inner, "tensor_data_names", None)
        if names:
            total += sum(getattr(inner, n).numel() * getattr(inner, n).element_size()
                         for n in [*names, *getattr(inner, "optional_tensor_data_names", [])]
                         if getattr(inner, n, None) is not None)
        else:
            total += inner.numel() * inner.element_size()
    return total / 2**30


def quantized_copy(model: torch.nn.Module, fmt: str, path: str) -> torch.nn.Module:
    from qconvert.convert import families, plan_for, selection_for
    from qconvert.convert.plan import real_config_source
    from qconvert.formats import FORMATS
    from qconvert.loaders.runtime import DEQUANT, TABLE, prepare

    plan = plan_for(real_config_source(families()["flux"]), "flux", fmt, selection_for())
    decided = {layer.name: layer.action for layer in plan.layers}
    q = copy.deepcopy(model)
    for name, module in q.named_modules():
        if isinstance(module, torch.nn.Linear) and decided.get(name, "keep") != "keep":
            w = FORMATS[fmt].quantize(module.weight.data, name=name)
            module.weight = torch.nn.Parameter(w, requires_grad=False)
    if path == "torchao weight-only":
        for module in q.modules():
            if isinstance(module, torch.nn.Linear) and hasattr(module.weight, "act_quant_kwargs"):
                DEQUANT.apply(module)
    else:
        chosen = prepare(q, torch.device("cuda"))
        assert TABLE, chosen
    return q


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--paths", nargs="+",
                    default=["bf16", "nvfp4", "mxfp8", "fp8", "nvfp4-torchao-weight-only"])
    args = ap.parse_args()
    from diffusers import FluxTransformer2DModel

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        base = FluxTransformer2DModel(guidance_embeds=True).eval()
    torch.set_default_dtype(torch.float32)
    x = inputs()
    rows = []
    for name in args.paths:
        torch.cuda.reset_peak_memory_stats()
        if name == "bf16":
            model = base
        elif name == "nvfp4-torchao-weight-only":
            model = quantized_copy(base, "nvfp4", "torchao weight-only")
        else:
            model = quantized_copy(base, name, "qconvert")
        with torch.inference_mode():
            model(**x)
            eager = time_ms(lambda m=model: m(**x), reps=5)
        row = {"path": name, "eager_ms": round(eager, 2), "weight_gib": round(weight_gib(model), 3)}
        try:
            row["graph_ms"] = round(graph_ms(model, x), 2)
        except Exception as e:
            row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if args.compile:
            t = time.perf_counter()
            model.compile_repeated_blocks(fullgraph=True)
            with torch.inference_mode():
                model(**x)
            row["compile_s"] = round(time.perf_counter() - t, 1)
            with torch.inference_mode():
                row["compiled_ms"] = round(time_ms(lambda m=model: m(**x), reps=10), 2)
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if model is not base:
            del model
            gc.collect()
            torch.cuda.empty_cache()
    bf16 = next((r for r in rows if r["path"] == "bf16"), None)
    for r in rows:
        for key in ("eager_ms", "graph_ms", "compiled_ms"):
            if bf16 and key in r and key in bf16:
                r[f"{key}_x_bf16"] = round(r[key] / bf16[key], 3)
    import diffusers
    import torchao
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "torchao": torchao.__version__, "diffusers": diffusers.__version__,
            "triton": triton.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
