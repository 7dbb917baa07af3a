"""Tiny FLUX → nvfp4/mxfp8/fp8 → qconvert.loaders on the GPU (the Hopper path on sm90): the
pipeline runs and the transformer output stays close to bf16. GPU only."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from qconvert.convert import convert
from qconvert.loaders import load_pipeline
from qconvert.tiny import flux as tiny_flux


def main() -> None:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        tiny_flux.build(src)
        ref = load_pipeline(src, device="cuda")
        for fmt in ("nvfp4", "mxfp8", "fp8"):
            dst = convert(Path(tmp) / fmt, fmt=fmt, source=src, progress=False).output
            pipe = load_pipeline(dst, device="cuda")
            kinds = sorted({type(m).__name__ for m in pipe.transformer.modules()
                            if "Linear" in type(m).__name__})
            g = torch.Generator("cuda").manual_seed(0)
            args = dict(prompt="a cat", generator=g, output_type="pt", **tiny_flux.CALL)
            img = pipe(**args).images
            g2 = torch.Generator("cuda").manual_seed(0)
            want = ref(**{**args, "generator": g2}).images
            out[fmt] = {"modules": kinds, "finite": bool(torch.isfinite(img).all()),
                        "image_rel_err_vs_bf16": float((img - want).norm() / want.norm())}
            print(fmt, out[fmt], flush=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
