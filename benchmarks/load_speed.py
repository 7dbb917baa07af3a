"""Load to GPU-ready, in one run: bf16 FLUX.1-dev through diffusers against our nvfp4 / fp8 /
mxfp8 checkpoints through the compatibility path (diffusers from_pretrained + runtime.prepare,
timed apart) and the fast path (qconvert.loaders.load_transformer), cold (page cache dropped)
and warm, with peak and final GPU memory and the disk's read rate measured in the same run.

FLUX.1-dev's real config with random weights (tiny/synthetic.py), converted with the GPU
(``qconvert flux --transformer-only --device cuda``). Each row is one fresh process: imports
and CUDA init first (untimed), then a cold load (the row's files evicted from the page cache
by that process: fadvise, plus drop_caches as root when pages remain), then two warm loads
(the fast-path row adds one with QCONVERT_LOAD_READER=safetensors). Formats are converted,
measured and deleted one at a time (the disk holds the source plus one output). JSON is
rewritten after every row; a load that would overrun --budget is skipped and says so.
``--smoke`` runs the whole script on a tiny-width FLUX on the CPU. GPU:

    python benchmarks/load_speed.py --workdir /tmp/qload --json load_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROW = r"""
import gc, json, os, sys, time, warnings
t_import = time.perf_counter()
import torch
from diffusers import AutoModel, FluxTransformer2DModel
from qconvert.loaders import fastload, fp8, hopper, load_transformer, reading, runtime
from qconvert.loaders.runtime import prepare
import torchao.prototype.mx_formats.nvfp4_tensor, torchao.prototype.safetensors.safetensors_utils
kind, path, deadline, dev = sys.argv[1], sys.argv[2], float(sys.argv[3]), torch.device(sys.argv[4])
sys.path.insert(0, sys.argv[5])
from load_speed import evict
from pathlib import Path
files = sorted(Path(path).rglob("*.safetensors"))
cuda = dev.type == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
if cuda:
    torch.cuda.init(); torch.zeros(1, device=dev); sync()
fp8.mslk_available()  # the fp8 log line asks; an mslk import is not load time
print("IMPORTED=" + json.dumps(time.perf_counter() - t_import), flush=True)
sub = {"subfolder": "transformer"} if (os.path.isdir(os.path.join(path, "transformer"))) else {}

def load():
    t0 = time.perf_counter()
    if kind == "bf16":
        m = FluxTransformer2DModel.from_pretrained(path, dtype=torch.bfloat16,
                                                   device_map=str(dev) if cuda else None, **sub)
        sync(); t1 = time.perf_counter()
        return m, {"seconds": t1 - t0}
    if kind == "compat":  # what load_transformer did before the fast path
        m = AutoModel.from_pretrained(path, dtype=torch.bfloat16,
                                      device_map=str(dev) if cuda else None, **sub)
        m.to(dev); sync(); t1 = time.perf_counter()
        prepare(m, dev); sync(); t2 = time.perf_counter()
        return m, {"seconds": t2 - t0, "from_pretrained_s": t1 - t0, "prepare_s": t2 - t1}
    m = load_transformer(path, device=str(dev))
    sync()
    return m, {"seconds": time.perf_counter() - t0}

runs = [("cold", "pread"), ("warm", "pread"), ("warm", "pread")]
if kind == "fast":
    runs.append(("warm", "safetensors"))
last = 30.0
for cache, reader in runs:
    if time.time() + 1.5 * last > deadline:
        print("RUN=" + json.dumps({"cache": cache, "reader": reader, "skipped": "budget"}))
        continue
    os.environ["QCONVERT_LOAD_READER"] = reader
    dropped = evict(files) if cache == "cold" else None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache(); getattr(torch._C, "_host_emptyCache", lambda: 0)()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    m, r = load()
    last = r["seconds"]
    r.update(cache=cache, reader=reader, evicted=dropped,
             peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None,
             final_gib=(torch.cuda.memory_allocated() - base) / 2**30 if cuda else None,
             modules=sorted({type(x).__name__ for x in m.modules()
                             if "Linear" in type(x).__name__}))
    print("RUN=" + json.dumps(r), flush=True)
    del m
"""


HERE = str(Path(__file__).resolve().parent)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cached_bytes(files: list[Path]) -> int | None:
    """Bytes of these files in the page cache (util-linux fincore), or None without it."""
    if not shutil.which("fincore"):
        return None
    proc = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES", *map(str, files)], capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    try:
        return sum(int(x) for x in proc.stdout.split())
    except ValueError:
        return None


def evict(files: list[Path]) -> dict[str, Any]:
    """Make a cold read of ``files``: written back, then their pages dropped with
    fadvise(DONTNEED) (the Python libraries stay cached, so the next process imports at the
    usual speed); the whole page cache too (drop_caches, root) when pages remain or fincore
    cannot tell. Says how, and what fincore still sees cached."""
    from qconvert.evaluate.bench import drop_page_cache

    how = "fadvise" if drop_page_cache(files) else "fadvise failed"
    left = cached_bytes(files)
    if left is None or left > 0:
        how += "+drop_caches" if drop_caches() else "+drop_caches failed (not root)"
        left = cached_bytes(files)
    return {"how": how, "cached_bytes_after": left}


def disk_rates(files: list[Path]) -> dict[str, Any]:
    """Read rates of files not in the page cache: dd (one sequential stream, as the issue
    defines the floor) and 8 threads of 16 MiB preads (the fast path's pattern)."""
    out: dict[str, Any] = {"evicted": evict(files)}
    n = 2 * 2**30
    dd = subprocess.run(
        ["dd", f"if={files[0]}", "of=/dev/null", "bs=16M", f"count={n // 2**24}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    m = re.search(r"(\d+) bytes.*copied, ([\d.]+) s", dd.stderr)
    out["dd_file"] = str(files[0])
    out["dd_gb_s"] = int(m.group(1)) / float(m.group(2)) / 1e9 if m else None
    out["dd_stderr"] = dd.stderr.strip().splitlines()[-1:] if dd.stderr else []
    path = files[-1]
    size = min(path.stat().st_size, 4 * 2**30)
    chunk, offsets = 16 * 2**20, iter(range(0, size, 16 * 2**20))
    lock = threading.Lock()
    fd = os.open(path, os.O_RDONLY)

    def work() -> None:
        buf = bytearray(chunk)
        while True:
            with lock:
                off = next(offsets, None)
            if off is None:
                return
            os.preadv(fd, [memoryview(buf)], off)

    t = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    os.close(fd)
    out["parallel_file"], out["parallel_gb_s"] = str(path), size / (time.perf_counter() - t) / 1e9
    return out


def file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def run_row(kind: str, fmt: str, path: Path, deadline: float, device: str) -> list[dict[str, Any]]:
    left = deadline - time.time()
    if left < 30:
        return [{"kind": kind, "format": fmt, "skipped": "budget"}]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", ROW, kind, str(path), str(deadline), device, HERE],
            capture_output=True, text=True, timeout=left, check=False,
        )  # fmt: skip
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr, code = "timed out (budget)", None
    rows = []
    for line in stdout.splitlines():
        if line.startswith("RUN="):
            rows.append({"kind": kind, "format": fmt, **json.loads(line[4:])})
    if code != 0 or not rows:
        rows.append({"kind": kind, "format": fmt, "error": stderr[-1500:], "returncode": code})
    logs = [x for x in stderr.splitlines() if "qconvert:" in x]
    for row in rows:
        row["file_gib"] = file_bytes(path) / 2**30
        row["log"] = logs[-4:]
    return rows


def _met(s: dict[str, Any], key: str, limit: float) -> bool | None:
    """Whether ``s[key]`` is within ``limit``; None when this run did not measure it."""
    return None if key not in s else bool(s[key] <= limit)


def summarize(rows: list[dict[str, Any]], disk: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the targets: warm (best of the warm loads) against bf16's best warm;
    cold against the disk floor (file bytes / dd rate); peak against final GPU memory."""

    def best(kind: str, fmt: str, cache: str) -> dict[str, Any] | None:
        want = (kind, fmt, cache, "pread")
        got = [
            r for r in rows
            if (r["kind"], r["format"], r.get("cache"), r.get("reader")) == want and "seconds" in r
        ]  # fmt: skip
        return min(got, key=lambda r: r["seconds"]) if got else None

    bf16, rate = best("bf16", "bf16", "warm"), disk.get("dd_gb_s")
    out: dict[str, Any] = {}
    for fmt, target in {"nvfp4": 0.5, "mxfp8": 0.7, "fp8": 0.7}.items():
        s: dict[str, Any] = {"warm_target_x_bf16": target}
        for kind in ("fast", "compat"):
            warm, cold = best(kind, fmt, "warm"), best(kind, fmt, "cold")
            if warm and bf16:
                s[f"{kind}_warm_x_bf16"] = round(warm["seconds"] / bf16["seconds"], 3)
            if warm and warm["final_gib"]:
                s[f"{kind}_peak_x_final"] = round(warm["peak_gib"] / warm["final_gib"], 3)
            if cold and rate:
                s["disk_floor_s"] = round(cold["file_gib"] * 2**30 / (rate * 1e9), 2)
                s[f"{kind}_cold_x_disk_floor"] = round(cold["seconds"] / s["disk_floor_s"], 3)
        s["met"] = {
            "warm": _met(s, "fast_warm_x_bf16", target),
            "cold_within_15pct": _met(s, "fast_cold_x_disk_floor", 1.15),
            "peak_le_1.1x": _met(s, "fast_peak_x_final", 1.1),
        }
        out[fmt] = s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--formats", nargs="+", default=["nvfp4", "fp8", "mxfp8"])
    ap.add_argument("--budget", type=float, default=530.0, help="seconds for the whole run")
    ap.add_argument("--keep", action="store_true", help="keep the converted outputs")
    ap.add_argument(
        "--smoke", action="store_true", help="a tiny-width FLUX on the CPU: checks the script"
    )
    args = ap.parse_args()
    start = time.time()
    deadline = start + args.budget
    import torch

    from qconvert.convert import convert
    from qconvert.convert.recipes import families
    from qconvert.tiny.synthetic import write_flux_source

    result: dict[str, Any] = {
        "meta": {
            "gpu": torch.cuda.get_device_name() if not args.smoke else None,
            "torch": torch.__version__, "smoke": args.smoke,
            "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
            "disk_free_gib": shutil.disk_usage(args.workdir.parent).free / 2**30,
        },
        "rows": [],
    }  # fmt: skip
    rows: list[dict[str, Any]] = result["rows"]

    def save() -> None:
        result["elapsed_s"] = round(time.time() - start, 1)
        args.json.write_text(json.dumps(result, indent=2))

    args.workdir.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    src = args.workdir / ("src-flux-tiny" if args.smoke else "src-flux-real")
    if not (src / "transformer" / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        t = time.perf_counter()
        if args.smoke:
            write_flux_source(src, 2, 2, shard_bytes=50 * 10**6)
        else:
            real = families()["flux"].real_config
            write_flux_source(src, 19, 38, real_config=real, shard_bytes=5 * 10**9, device=device)
        result["source_write_s"] = round(time.perf_counter() - t, 1)
    shards = sorted((src / "transformer").glob("*.safetensors"))
    result["disk"] = disk = disk_rates(shards)
    save()
    rows += run_row("bf16", "bf16", src, deadline, device)
    save()
    for fmt in args.formats:
        out = args.workdir / f"flux-{fmt}"
        if not (out / "config.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            if time.time() + 90 > deadline:
                rows.append({"kind": "convert", "format": fmt, "skipped": "budget"})
                continue
            t = time.perf_counter()
            convert(out, source=src, fmt=fmt, device=device, transformer_only=True,
                    progress=False, command="benchmark")  # fmt: skip
            rows.append({"kind": "convert", "format": fmt, "seconds": time.perf_counter() - t})
            save()
        for kind in ("fast", "compat"):
            rows += run_row(kind, fmt, out, deadline, device)
            result["summary"] = summarize(rows, disk)
            save()
        if not args.keep:
            shutil.rmtree(out)
    result["summary"] = summarize(rows, disk)
    save()
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
