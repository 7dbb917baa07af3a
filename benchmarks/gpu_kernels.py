"""Time the Hopper Triton kernels (qconvert/loaders/hopper.py) against bf16 cuBLAS and torchao.

    python benchmarks/gpu_kernels.py --json out.json [--quick] [--smoke]

For each format (nvfp4, mxfp8) and each FLUX.1-dev Linear shape (M = 4096 + 512 tokens at
1024², N x K in 3072x3072, 9216x3072, 12288x3072, 3072x12288, 3072x15360), plus smaller M on
two shapes (4096 / 512: the image / text streams of the double blocks; 77 and 1), it times:

- ``bf16_mm``: ``F.linear(x, W_bf16, b)`` (cuBLAS; W = the dequantized weight), the baseline;
- ``torchao_dequant_mm``: ``W.dequantize(bf16)`` then F.linear (and the dequantize alone);
- ``dequant`` / ``dequant_mm``: our dequantize kernel alone (every tile config; GB/s counts
  the packed bytes read plus the bf16 bytes written) / then F.linear;
- ``fused``: our fused kernel, every candidate tile config (``fused_configs_graph_ms``), the
  best one, and the best one with the inline-asm decode / bf16x2 scaling off (``fused_noasm``);
- ``auto``: ``qconvert::hopper_linear`` after it picked its path.

Three clocks: the median of ``triton.testing.do_bench`` (L2 flushed before every call, launch
overhead included where the GPU outruns the host); GPU time per call from CUDA graphs of 10
back-to-back calls, the graphs of all paths replayed round-robin 15 times (median, min, max:
no launch gaps, L2 not flushed; what a graph-captured model sees); and eager wall time per
call with the queue kept full (max of host cost and GPU time). Each row also checks the fused
and dequant+mm results against an fp32 reference (relative norm error) and the dequantize
kernel bit for bit against torchao.
Ceilings from the same run: a device copy (GB/s, read + write) and an 8192³ bf16 matmul.
``--smoke`` runs tiny shapes with a host timer (CPU + TRITON_INTERPRET=1), to test this
script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qconvert.formats import FORMATS  # noqa: E402
from qconvert.loaders import hopper  # noqa: E402

M_FLUX = 4096 + 512
FLUX_NK = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (3072, 15360)]
SMALL_M = {(12288, 3072): [4096, 512, 77, 1], (3072, 3072): [512, 77, 1]}


def _timer(smoke: bool) -> Callable[[Callable[[], Any]], float]:
    if not smoke:
        import triton

        def bench(fn: Callable[[], Any]) -> float:
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

        return bench

    def host_bench(fn: Callable[[], Any]) -> float:
        fn()
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    return host_bench


def _ceilings(bench: Callable[[Callable[[], Any]], float], device: str) -> dict[str, float]:
    a = torch.empty(2**29, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    t_copy = bench(lambda: b.copy_(a))
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    y = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    t_mm = bench(lambda: torch.mm(x, y))
    return {
        "copy_GBps": 2 * a.numel() / t_copy / 1e6,
        "bf16_mm_8192_TFLOPs": 2 * 8192**3 / t_mm / 1e9,
    }


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def _graph_rounds(
    fns: dict[str, Callable[[], Any]], calls: int = 10, rounds: int = 15
) -> dict[str, dict[str, float]]:
    """GPU ms per call of each fn: one CUDA graph of ``calls`` back-to-back calls per fn, the
    graphs replayed round-robin ``rounds`` times (so clock drift hits all alike)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.cuda.stream(stream):
        graphs = {}
        for name, fn in fns.items():
            fn()
            fn()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                for _ in range(calls):
                    fn()
            g.replay()
            graphs[name] = g
        for _ in range(rounds):
            for name, g in graphs.items():
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                g.replay()
                end.record(stream)
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / calls)
    torch.cuda.current_stream().wait_stream(stream)
    del graphs
    return {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
        for name, v in samples.items()
    }


def _host_us(fn: Callable[[], Any], device: str, calls: int = 200) -> float:
    """Eager wall time per call with the queue kept full: max(host cost, GPU time)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def _overhead_probe(device: str) -> dict[str, dict[str, float]]:
    """Eager wall us per call (queue full) at M = 1, 3072 x 3072 nvfp4, where the GPU work is
    ~10-20 us, so host costs show: which layer of the call stack costs what."""
    from torch import nn

    n = k = 64 if device == "cpu" else 3072
    qw = FORMATS["nvfp4"].quantize((torch.randn(n, k, device=device) * 0.02).bfloat16())
    p = hopper.pack_weight(qw)
    x = torch.randn(1, k, device=device).bfloat16()
    bias = torch.randn(n, device=device).bfloat16()
    wd = qw.dequantize(torch.bfloat16)
    fargs = (x, p.qdata, p.scale, p.tensor_scale, bias, "nvfp4")
    lin = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    lin.weight = nn.Parameter(qw, requires_grad=False)
    mod = hopper.HopperQuantLinear.from_linear(lin)
    torch.ops.qconvert.hopper_linear.default(*fargs)  # tunes
    cfg = hopper._pick_config(*fargs)
    cases: dict[str, Callable[[], Any]] = {
        "F.linear bf16 (cuBLAS)": lambda: F.linear(x, wd, bias),
        "launch_dequant (1 Triton launch)": lambda: hopper.launch_dequant(*fargs[1:4], fargs[5]),
        "launch_fused (1 Triton launch)": lambda: hopper.launch_fused(*fargs, config=cfg),
        "_dequant_mm (Triton + cuBLAS)": lambda: hopper._dequant_mm(*fargs),
        "hopper_linear via CustomOpDef": lambda: hopper.hopper_linear(*fargs),
        "torch.ops.qconvert.hopper_linear.default": lambda: (
            torch.ops.qconvert.hopper_linear.default(*fargs)
        ),
        "HopperQuantLinear(auto).forward": lambda: mod(x),
    }
    out: dict[str, dict[str, float]] = {}
    for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        with ctx():
            out[mode] = {name: _host_us(fn, device, calls=500) for name, fn in cases.items()}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = "cpu" if args.smoke else "cuda"
    bench = _timer(args.smoke)
    graph = bench
    if args.smoke:
        hopper._bench = bench  # the autotuner times with the host timer too
    torch.manual_seed(0)
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    try:
        import torchao
        import triton

        info["torchao"] = torchao.__version__
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["sm"] = f"{props.major}{props.minor}"
        info["multiprocessors"] = props.multi_processor_count
        info.update(_ceilings(bench, device))
    print(json.dumps(info), flush=True)

    shapes = [(64, 64)] if args.smoke else FLUX_NK
    m_main = 40 if args.smoke else M_FLUX
    rows: list[dict[str, Any]] = []
    for fmt in args.formats:
        for n, k in shapes:
            w_hp = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
            qw = FORMATS[fmt].quantize(w_hp)
            p = hopper.pack_weight(qw)
            wd = qw.dequantize(torch.bfloat16)
            w32 = qw.dequantize(torch.float32)
            bias = (torch.randn(n, device=device) * 0.1).to(torch.bfloat16)
            pargs = (p.qdata, p.scale, p.tensor_scale, fmt)

            # the dequantize kernel, once per weight
            dq_cfg, _ = hopper.tune_dequant(*pargs)  # graph-timed choice
            dq_times = {
                f"r{c[0]}c{c[1]}w{c[2]}": bench(
                    lambda c=c, pargs=pargs: hopper.launch_dequant(*pargs, config=c)
                )
                for c in hopper.DEQUANT_CONFIGS
            }  # eager, L2 flushed before each run: the HBM figure
            t_dq = min(dq_times.values())
            dq_out = hopper.launch_dequant(*pargs)
            dq_exact = bool(torch.equal(dq_out.view(torch.int16), wd.view(torch.int16)))
            t_ao_dq = bench(lambda qw=qw: qw.dequantize(torch.bfloat16))
            dq_bytes = hopper.weight_bytes(fmt, n, k) + 2 * n * k

            ms = [m_main] if (args.quick or args.smoke) else [m_main, *SMALL_M.get((n, k), [])]
            for m in ms:
                x = torch.randn(m, k, device=device).to(torch.bfloat16)
                ref = x.float() @ w32.T + bias.float()
                fargs = (x, *pargs[:3], bias, fmt)
                best, cfg_times = hopper.tune_fused(*fargs)  # graph-timed per config
                path, _ = hopper.choose_path(*fargs)
                fns: dict[str, Callable[[], Any]] = {
                    "bf16_mm": lambda x=x, wd=wd, b=bias: F.linear(x, wd, b),
                    "torchao_dequant_mm": lambda x=x, qw=qw, b=bias: F.linear(
                        x, qw.dequantize(torch.bfloat16), b
                    ),
                    "dequant_mm": lambda fargs=fargs: hopper._dequant_mm(*fargs),
                    "fused": lambda fargs=fargs, c=best: hopper.launch_fused(*fargs, config=c),
                    "fused_noasm": lambda fargs=fargs, c=best: hopper.launch_fused(
                        *fargs, config=c, use_asm=False
                    ),
                    "auto": lambda fargs=fargs: torch.ops.qconvert.hopper_linear(*fargs),
                }
                ms_eager = {name: bench(fn) for name, fn in fns.items()}
                if args.smoke:
                    spread = {n_: {"median": graph(fn)} for n_, fn in fns.items()}
                else:
                    spread = _graph_rounds(fns)
                ms_graph = {name: v["median"] for name, v in spread.items()}
                host_us = {name: _host_us(fn, device) for name, fn in fns.items()}
                fused_rel = _rel(fns["fused"](), ref)
                noasm_rel = _rel(fns["fused_noasm"](), ref)
                dqmm_rel = _rel(fns["dequant_mm"](), ref)
                flop = 2 * m * n * k
                g = ms_graph
                row = {
                    "fmt": fmt,
                    "M": m,
                    "N": n,
                    "K": k,
                    "ms_graph": ms_graph,
                    "ms_graph_spread": spread,
                    "eager_us_per_call_queue_full": host_us,
                    "ms_eager_l2_flushed": ms_eager,
                    "bf16_mm_TFLOPs": flop / g["bf16_mm"] / 1e9,
                    "fused_TFLOPs": flop / g["fused"] / 1e9,
                    "torchao_dequant_ms": t_ao_dq,
                    "torchao_dequant_GBps": dq_bytes / t_ao_dq / 1e6,
                    "dequant_ms": t_dq,
                    "dequant_GBps": dq_bytes / t_dq / 1e6,
                    "dequant_bytes": dq_bytes,
                    "dequant_config": list(dq_cfg),
                    "dequant_configs": dq_times,
                    "dequant_bit_exact": dq_exact,
                    "dequant_mm_rel_err": dqmm_rel,
                    "fused_config": best.name,
                    "fused_configs_graph_ms": cfg_times,
                    "fused_rel_err": fused_rel,
                    "fused_noasm_rel_err": noasm_rel,
                    "auto_path": path,
                    "ratio_to_bf16_graph": {
                        name: g[name] / g["bf16_mm"] for name in fns if name != "bf16_mm"
                    },
                    "ratio_to_bf16_eager": {
                        name: ms_eager[name] / ms_eager["bf16_mm"]
                        for name in fns
                        if name != "bf16_mm"
                    },
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    overhead = _overhead_probe(device)
    print(json.dumps({"host_overhead_us": overhead}), flush=True)
    return {"info": info, "rows": rows, "host_overhead_us": overhead}


def _table(result: dict[str, Any]) -> str:
    head = (
        f"{'fmt':6} {'M':>5} {'N':>6} {'K':>6} | {'bf16':>6} {'TF/s':>4} | {'ao dq+mm':>8} | "
        f"{'dq':>6} {'GB/s':>5} {'dq+mm':>6} {'x':>5} | {'fused':>6} {'TF/s':>4} {'x':>5} "
        f"{'noasm':>6} | {'auto':>10} {'x':>5}"
    )
    lines = [
        "GPU ms per call from CUDA-graph replays (ao dq+mm and dq: eager, L2 flushed); "
        "x = ratio to bf16 mm",
        head,
        "-" * len(head),
    ]
    for r in result["rows"]:
        g = r["ms_graph"]
        q = r["ratio_to_bf16_graph"]
        lines.append(
            f"{r['fmt']:6} {r['M']:>5} {r['N']:>6} {r['K']:>6} | {g['bf16_mm']:6.3f} "
            f"{r['bf16_mm_TFLOPs']:4.0f} | {r['ms_eager_l2_flushed']['torchao_dequant_mm']:8.3f} | "
            f"{r['dequant_ms']:6.3f} {r['dequant_GBps']:5.0f} {g['dequant_mm']:6.3f} "
            f"{q['dequant_mm']:5.2f} | {g['fused']:6.3f} {r['fused_TFLOPs']:4.0f} "
            f"{q['fused']:5.2f} {g['fused_noasm']:6.3f} | {r['auto_path']:>10} {q['auto']:5.2f}"
        )
    lines += [
        "",
        "eager us per call, queue kept full (max of host cost and GPU time)",
        f"{'fmt':6} {'M':>5} {'N':>6} {'K':>6} | "
        + " ".join(f"{n:>12}" for n in ("bf16_mm", "dequant_mm", "fused", "auto")),
    ]
    for r in result["rows"]:
        h = r.get("eager_us_per_call_queue_full", {})
        lines.append(
            f"{r['fmt']:6} {r['M']:>5} {r['N']:>6} {r['K']:>6} | "
            + " ".join(
                f"{h.get(n, float('nan')):12.1f}"
                for n in ("bf16_mm", "dequant_mm", "fused", "auto")
            )
        )
    lines += ["", "host overhead probe: eager us per call at M=1, 3072x3072 nvfp4 (queue full)"]
    for mode, cases in result.get("host_overhead_us", {}).items():
        for name, us in cases.items():
            lines.append(f"  {mode:14} {name:42} {us:8.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--formats", nargs="+", default=["nvfp4", "mxfp8"])
    ap.add_argument("--quick", action="store_true", help="FLUX M only, no small-M rows")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    result = run(args)
    print(_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
