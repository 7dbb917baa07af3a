"""Conversion speed and memory, disk to disk: params/s, wall time and peak RSS per format and
quantizer path, plus the read / write bandwidth that bound them. A script, not a test.

    python benchmarks/convert_speed.py --workdir /tmp/bench --double 2 --single 4 \
        --formats nvfp4 mxfp8 --quantizers reference fast --json results/cpu.json
    python benchmarks/convert_speed.py --workdir /tmp/bench --real-width --double 19 \
        --single 38 --device cuda --gen-device cuda --json results/h100.json   # full FLUX.1-dev

The source is a FLUX-shaped bf16 checkpoint with random weights (real FLUX.1-dev widths with
--real-width); speed depends on shapes, not values. Each conversion runs in its own process
so its peak RSS (VmHWM, reset after imports) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ONE = """
import json, sys, time
from qconvert import formats
from qconvert.convert import convert
args = json.loads(sys.argv[1])
if not args['fast']:
    formats.FAST_CPU_BUILDERS.clear()  # torchao's reference construction for every weight
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
base = status('VmRSS')
t = time.perf_counter()
result = convert(args['out'], source=args['source'], fmt=args['fmt'], device=args['device'],
                 progress=False, overwrite=True, transformer_only=True,
                 command='benchmark')
print('RESULT=' + json.dumps({'seconds': time.perf_counter() - t, 'base': base,
      'peak': status('VmHWM'), 'params': result.plan.summary()['params'],
      'source_bytes': result.plan.source_bytes, 'output_bytes': result.plan.output_bytes}))
"""


def bandwidth(source: Path, scratch: Path) -> dict[str, float]:
    """Read every source tensor (+ amax, the least any quantizer does) and write as many
    bytes, with the same readers and writers the converter uses."""
    import torch

    from qconvert.safetensors_io import ShardWriter, read_header, read_tensor

    headers = [read_header(p) for p in sorted((source / "transformer").glob("*.safetensors"))]
    total = sum(i.nbytes for h in headers for i in h.tensors.values())
    t = time.perf_counter()
    for h in headers:
        with h.path.open("rb") as f:
            for info in h.tensors.values():
                read_tensor(info, f).abs().amax()
    read_s = time.perf_counter() - t
    block = torch.zeros(64 << 20, dtype=torch.uint8)
    n = -(-total // block.numel())
    t = time.perf_counter()
    writer = ShardWriter(scratch, {f"b{i}": (torch.uint8, (block.numel(),)) for i in range(n)}, {})
    for i in range(n):
        writer.put(f"b{i}", block)
    writer.close()
    write_s = time.perf_counter() - t
    scratch.unlink()
    return {"bytes": total, "read_amax_gb_s": total / read_s / 1e9,
            "read_amax_m_params_s": total / 2 / read_s / 1e6,
            "write_gb_s": n * block.numel() / write_s / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--real-width", action="store_true")
    ap.add_argument("--formats", nargs="+", default=["nvfp4", "mxfp8"])
    ap.add_argument("--quantizers", nargs="+", default=["reference", "fast"],
                    choices=["reference", "fast"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gen-device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from qconvert.convert.recipes import families
    from qconvert.tiny.synthetic import write_flux_source

    source = args.workdir / f"src-{args.double}-{args.single}-{int(args.real_width)}"
    if not source.exists():
        t = time.perf_counter()
        real = families()["flux"].real_config if args.real_width else None
        write_flux_source(source, args.double, args.single, real_config=real,
                          shard_bytes=5 * 10**9, device=args.gen_device)
        print(f"generated {source} in {time.perf_counter() - t:.1f} s", flush=True)
    bw = bandwidth(source, args.workdir / "scratch.bin")
    print(json.dumps(bw), flush=True)
    rows = []
    for fmt in args.formats:
        for quantizer in args.quantizers:
            out = args.workdir / f"out-{fmt}"
            payload = {"out": str(out), "source": str(source), "fmt": fmt,
                       "device": args.device, "fast": quantizer == "fast"}
            proc = subprocess.run([sys.executable, "-c", ONE, json.dumps(payload)],
                                  capture_output=True, text=True, check=False)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT=")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{fmt}/{quantizer} failed")
            r = json.loads(line[0][7:])
            row = {"format": fmt, "quantizer": quantizer, "device": args.device,
                   "seconds": round(r["seconds"], 2),
                   "m_params_per_s": round(r["params"] / r["seconds"] / 1e6, 1),
                   "source_gb_per_s": round(r["source_bytes"] / r["seconds"] / 1e9, 3),
                   "peak_rss_growth_gib": round((r["peak"] - r["base"]) / 2**30, 3),
                   "params": r["params"], "output_gib": round(r["output_bytes"] / 2**30, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    import diffusers
    import torchao

    meta = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
        "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
        "torch": torch.__version__, "torchao": torchao.__version__,
        "diffusers": diffusers.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "source": {"double_blocks": args.double, "single_blocks": args.single,
                   "real_width": args.real_width, "bytes": bw["bytes"]},
    }
    result = {"meta": meta, "bandwidth": bw, "rows": rows}
    print(f"\n{'format':8} {'quantizer':10} {'s':>8} {'Mparams/s':>10} {'peak RSS +GiB':>14}")
    for row in rows:
        print(f"{row['format']:8} {row['quantizer']:10} {row['seconds']:8.2f} "
              f"{row['m_params_per_s']:10.1f} {row['peak_rss_growth_gib']:14.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
