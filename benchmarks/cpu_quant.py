"""Time torchao's reference construction against qconvert's fast quantizers on CPU.

    python benchmarks/cpu_quant.py --json out.json [--rows 3072 --cols 12288 --repeats 5]

For each format: one warm-up call of each implementation, then ``--repeats`` timed calls;
the median is reported in M elements/s together with the speedup and ``os.getloadavg()``.
The runner's cores may be shared with other jobs, so every timed call also records the
share of the machine's CPU time that *other* processes used meanwhile (``/proc/stat``
minus this process's own time). Calls taken while that share is above ``--busy`` are
retried (up to ``--attempts`` times in all); the JSON keeps every sample and says whether
the median came from quiet runs only. The fast result is also checked byte-for-byte
against the reference on the benchmark weight.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qconvert.formats import FORMATS
from qconvert.formats.fastquant import quantize_mxfp8, quantize_nvfp4

warnings.filterwarnings("ignore")

FAST: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "nvfp4": quantize_nvfp4,
    "mxfp8": quantize_mxfp8,
}


def _busy_ticks() -> int | None:
    """Non-idle jiffies of the whole machine, or None where /proc/stat does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle


def _timed(fn: Callable[[], Any]) -> tuple[float, float | None]:
    """(seconds, share of all cores other processes used meanwhile, 0..1 or None)."""
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    busy0, own0 = _busy_ticks(), os.times()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    busy1, own1 = _busy_ticks(), os.times()
    if busy0 is None or busy1 is None:
        return dt, None
    own = (own1.user - own0.user + own1.system - own0.system) * hz
    foreign = max(0.0, (busy1 - busy0 - own) / hz) / (ncpu * dt)
    return dt, min(1.0, foreign)


def wait_for_quiet(busy: float, max_wait: float) -> float | None:
    """Sleep in 0.5 s windows until other processes use at most ``busy`` of the machine.

    Returns the last window's share (None without /proc/stat); gives up after max_wait.
    """
    deadline = time.monotonic() + max_wait
    while True:
        _, share = _timed(lambda: time.sleep(0.5))
        if share is None or share <= busy or time.monotonic() > deadline:
            return share


def measure(
    fn: Callable[[], Any], repeats: int, attempts: int, busy: float, max_wait: float
) -> dict[str, Any]:
    fn()  # warm-up
    samples: list[dict[str, float | None]] = []
    quiet: list[float] = []
    for _ in range(max(attempts, repeats)):
        before = wait_for_quiet(busy, max_wait)
        dt, foreign = _timed(fn)
        samples.append({"seconds": dt, "foreign_cpu": foreign, "foreign_cpu_before": before})
        # /proc/stat counts 10 ms ticks: allow two ticks of slack on short runs.
        slack = 2 / (os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1) * dt)
        if foreign is None or (foreign <= busy + slack and (before or 0.0) <= busy):
            quiet.append(dt)
        if len(quiet) >= repeats:
            break
    all_times = [float(s["seconds"]) for s in samples]  # type: ignore[arg-type]
    return {
        "median_s": statistics.median(quiet if quiet else all_times),
        "quiet_runs": len(quiet),
        "quiet": len(quiet) >= repeats,
        "samples": samples,
    }


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    names = [*b.tensor_data_names, *getattr(b, "optional_tensor_data_names", [])]
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            if x is not y:
                return False
            continue
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    attrs = [*b.tensor_attribute_names, *getattr(b, "optional_tensor_attribute_names", [])]
    return all(getattr(a, n) == getattr(b, n) for n in attrs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=12288)
    ap.add_argument("--repeats", type=int, default=5, help="quiet timed runs per case")
    ap.add_argument("--attempts", type=int, default=15, help="max timed runs per case")
    ap.add_argument(
        "--busy",
        type=float,
        default=0.10,
        help="retry a run when other processes used more than this CPU share",
    )
    ap.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="max seconds to wait for a quiet machine before each run",
    )
    ap.add_argument("--formats", nargs="+", default=list(FAST), choices=list(FAST))
    ap.add_argument("--fast-only", action="store_true", help="skip timing the reference")
    args = ap.parse_args(argv)

    weight = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)).to(
        torch.bfloat16
    )
    n = weight.numel()
    report: dict[str, Any] = {
        "shape": [args.rows, args.cols],
        "dtype": "bfloat16",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "loadavg_start": list(os.getloadavg()),
        "results": {},
    }
    print(
        f"weight {args.rows}x{args.cols} bf16, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, loadavg {os.getloadavg()}"
    )
    for fmt in args.formats:
        ref_fn, fast_fn = FORMATS[fmt].build, FAST[fmt]
        entry: dict[str, Any] = {}
        impls = (
            [("fast", fast_fn)] if args.fast_only else [("reference", ref_fn), ("fast", fast_fn)]
        )
        for label, fn in impls:
            res = measure(
                lambda fn=fn: fn(weight), args.repeats, args.attempts, args.busy, args.wait
            )
            res["melem_per_s"] = n / res["median_s"] / 1e6
            res["loadavg"] = list(os.getloadavg())
            entry[label] = res
            foreign = [s["foreign_cpu"] for s in res["samples"]]
            shown = ", ".join("?" if f is None else f"{f:.0%}" for f in foreign)
            print(
                f"{fmt:6s} {label:9s} {res['median_s'] * 1e3:9.1f} ms  "
                f"{res['melem_per_s']:8.1f} M elem/s  "
                f"{'quiet' if res['quiet'] else 'BUSY '} (other CPU per run: {shown})  "
                f"loadavg {tuple(round(v, 2) for v in res['loadavg'])}"
            )
        if not args.fast_only:
            entry["speedup"] = entry["reference"]["median_s"] / entry["fast"]["median_s"]
            entry["identical"] = identical(fast_fn(weight), ref_fn(weight))
            print(
                f"{fmt:6s} speedup x{entry['speedup']:.1f}, "
                f"identical to reference: {entry['identical']}"
            )
        report["results"][fmt] = entry
    report["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    ok = all(e.get("identical", True) for e in report["results"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
