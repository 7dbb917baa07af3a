"""Load to GPU-ready from local disk: bf16 FLUX.1-dev through diffusers vs our nvfp4 / mxfp8 /
fp8 checkpoints through qconvert.loaders.load_transformer (diffusers loads, then the runtime
swap).
Cold (page cache dropped, when the machine allows) and warm, each load in a fresh process;
seconds, peak and final GPU GiB. Real config, random weights. GPU only.

    python benchmarks/load_speed.py --workdir /tmp/bench --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ONE = """
import json, sys, time, torch
from diffusers import FluxTransformer2DModel
from qconvert.loaders import load_transformer
torch.cuda.init(); torch.zeros(1, device="cuda")
path, kind = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if kind == "bf16":
    m = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                               dtype=torch.bfloat16, device_map="cuda")
else:
    m = load_transformer(path, device="cuda")
torch.cuda.synchronize()
s = time.perf_counter() - t
print("RESULT=" + json.dumps({"seconds": s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
      "final_gib": torch.cuda.memory_allocated() / 2**30}))
"""


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--formats", nargs="+", default=["nvfp4", "mxfp8", "fp8"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from qconvert.convert import convert
    from qconvert.convert.recipes import families
    from qconvert.tiny.synthetic import write_flux_source

    src = args.workdir / "src-19-38-1"
    if not src.exists():
        real = families()["flux"].real_config
        write_flux_source(src, 19, 38, real_config=real, shard_bytes=5 * 10**9, device="cuda")
    paths = {"bf16": src}
    for fmt in args.formats:
        out = args.workdir / f"load-{fmt}"
        if not out.exists():
            convert(
                out,
                source=src,
                fmt=fmt,
                device="cuda",
                transformer_only=True,
                progress=False,
                command="benchmark",
            )
        paths[fmt] = out
    rows = []
    for cache in ("cold", "warm"):
        for kind, path in paths.items():
            dropped = drop_caches() if cache == "cold" else None
            if cache == "warm":  # read once so the files are in the page cache
                for f in path.rglob("*.safetensors"):
                    with f.open("rb") as fh:
                        while fh.read(64 << 20):
                            pass
            proc = subprocess.run(
                [sys.executable, "-c", ONE, str(path), kind],
                capture_output=True,
                text=True,
                check=False,
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT=")]
            row = {"path": kind, "cache": cache, "caches_dropped": dropped}
            if line:
                row.update({k: round(v, 3) for k, v in json.loads(line[0][7:]).items()})
            else:
                row["error"] = proc.stderr[-600:]
            row["file_gib"] = round(
                sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**30, 3
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after every row: a run cut short keeps what it measured
                args.json.write_text(json.dumps({"rows": rows}, indent=2))
    import torch

    result = {
        "meta": {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
