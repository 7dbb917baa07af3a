"""Per-token FP8 activation quantization on the GPU: qconvert's Triton kernel
(``qconvert.loaders.fp8.quantize_rows``) against torchao's eager construction and a plain
device copy of the same bytes, at FLUX's activation shapes. Reports GPU ms (CUDA-graph replays)
and GB/s (bf16 read + e4m3 write + scales). GPU only.

    python benchmarks/act_quant.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHAPES = [(4608, 3072), (4096, 3072), (4608, 15360), (4096, 12288), (512, 3072), (18432, 3072)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    from qconvert.loaders.fp8 import quantize_rows
    from qconvert.loaders.hopper import bench_graph

    rows = []
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        nbytes = m * k * 3 + m * 4
        # a copy that reads and writes nbytes in all (half each)
        copy_src = torch.empty(nbytes // 4, device="cuda", dtype=torch.bfloat16)
        copy_dst = torch.empty_like(copy_src)

        def torchao(x: torch.Tensor = x, k: int = k) -> None:
            s = _choose_scale_float8(x, block_size=[1, k])
            _quantize_affine_float8(x, s)

        ours_ms = bench_graph(lambda x=x: quantize_rows(x))
        row = {
            "m": m, "k": k, "ours_ms": round(ours_ms, 4),
            "ours_gbps": round(nbytes / ours_ms / 1e6, 1),
            "torchao_eager_ms": round(bench_graph(torchao), 4),
            "copy_same_bytes_ms": round(bench_graph(lambda d=copy_dst, s=copy_src: d.copy_(s)), 4),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
