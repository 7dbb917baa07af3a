"""--device cuda quantizes with torchao's construction on the GPU: check it builds the same
bytes as the CPU construction (the reference the test suite proves against torchao's
``quantize_``), on random and adversarial weights of FLUX shapes, and time it. GPU only."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

from qconvert.formats import FORMATS


def cases(shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(*shape, generator=g).to(torch.bfloat16)
    zero_blocks = rand.clone()
    zero_blocks[:, :64] = 0
    outlier = rand * 0.01
    outlier[3, 7] = 3.0e4
    return {
        "random": rand,
        "zero_blocks": zero_blocks,
        "huge": rand * 1e37,
        "tiny": rand * 1e-35,
        "subnormal": (torch.full(shape, 1e-40) * torch.sign(rand.float())).to(torch.bfloat16),
        "outlier": outlier,
    }


def pieces(t: torch.Tensor) -> dict[str, torch.Tensor]:
    flat, meta = flatten_tensor_state_dict({"l.weight": t})
    return {k: v.cpu().reshape(-1).view(torch.uint8) for k, v in flat.items()} | {"meta": meta}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    for fmt, f in FORMATS.items():
        for shape in [(3072, 3072), (12288, 3072), (3072, 15360)]:
            for name, w in cases(shape).items():
                cpu = pieces(f.quantize(w, fast=False))
                gpu = pieces(f.quantize(w.cuda()))
                same = all(torch.equal(cpu[k], gpu[k]) if k != "meta" else cpu[k] == gpu[k]
                           for k in cpu)
                results.append({"format": fmt, "shape": shape, "case": name, "identical": same})
        w = torch.randn(3072, 12288, dtype=torch.bfloat16, device="cuda")
        f.quantize(w)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            f.quantize(w)
        torch.cuda.synchronize()
        rate = w.numel() * 10 / (time.perf_counter() - t) / 1e9
        results.append({"format": fmt, "cuda_g_elements_per_s": round(rate, 2)})
    bad = [r for r in results if r.get("identical") is False]
    print(json.dumps(results))
    print(f"{len([r for r in results if 'identical' in r])} cases, {len(bad)} differ: {bad}")
    if args.json:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(),
                                         "torch": torch.__version__, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
