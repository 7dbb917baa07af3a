"""FLUX.1-dev's real-shape transformer on the fp8 path with a r=16 LoRA on to_q/to_k/to_v/
to_out.0/proj_mlp (which unfuses the q/k/v GEMM), ``compile_repeated_blocks(fullgraph=True)``,
one step at 1024². On the H200 (torch 2.11) inductor failed to lower ``torch._scaled_mm`` on a
view of the fused weight (benchmarks/results/repro_fp8_lora_h200.txt); since then a slice runs
through qconvert's opaque op. Prints OK or the traceback's end; writes OUT/repro_fp8_lora.txt.

    python benchmarks/repro_fp8_lora.py
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_step import build
from lora_step import TARGETS, add_lora

from qconvert.evaluate import realshape


def main() -> None:
    out = Path(os.environ.get("OUT", "."))
    torch._dynamo.config.cache_size_limit = 64
    d = {"device": "cuda", "dtype": torch.bfloat16}
    g = torch.Generator("cuda").manual_seed(0)
    x = {
        "hidden_states": torch.randn(1, 4096, 64, generator=g, **d),
        "encoder_hidden_states": torch.randn(1, 512, 4096, generator=g, **d),
        "pooled_projections": torch.randn(1, 768, generator=g, **d),
        "timestep": torch.tensor([0.5], **d),
        "guidance": torch.tensor([3.5], **d),
        "img_ids": torch.zeros(4096, 3, **d),
        "txt_ids": torch.zeros(512, 3, **d),
        "return_dict": False,
    }
    model, _ = build("fp8", realshape.recipe("flux"))
    add_lora(model, TARGETS, 16)
    model.compile_repeated_blocks(fullgraph=True)
    t = time.perf_counter()
    try:
        with torch.inference_mode():
            model(**x)
        torch.cuda.synchronize()
        msg = f"OK: compiled fp8 + LoRA step in {time.perf_counter() - t:.1f} s (compile included)"
    except Exception:
        msg = "FAIL\n" + traceback.format_exc()[-12000:]
    print(msg[:3000], flush=True)
    (out / "repro_fp8_lora.txt").write_text(msg)


if __name__ == "__main__":
    main()
