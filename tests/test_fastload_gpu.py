"""The fast load path on the GPU (skipped without CUDA): for tiny FLUX in each format,
``load_transformer`` / ``load_pipeline`` build what the compatibility path (diffusers +
runtime.prepare, ``QCONVERT_FAST_LOAD=0``) builds on this device — the same modules, tensors
and attributes, the same transformer output bit for bit — and only CUDA memory the model
keeps is left allocated."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from model_compare import same_model, same_weights
from test_convert import transformer_inputs

from qconvert.loaders import load_pipeline, load_transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "fp8"])
def test_fast_equals_compatibility_path_on_cuda(
    fmt: str, converted: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    fast = load_transformer(converted[fmt], device="cuda")
    torch.cuda.synchronize()
    kept = sum(
        t.untyped_storage().nbytes()
        for p in [*fast.parameters(), *fast.buffers()]
        for t in [p, *(getattr(p, n) for n in getattr(p, "tensor_data_names", []))]
        if type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter)
    )
    assert torch.cuda.memory_allocated() - base <= kept * 1.02 + 2**20
    monkeypatch.setenv("QCONVERT_FAST_LOAD", "0")
    old = load_transformer(converted[fmt], device="cuda").eval()  # see test_fastload.old_path
    same_model(fast, old)
    inputs = {k: v.to(CUDA) for k, v in transformer_inputs(fast).items()}
    with torch.no_grad():
        fast(**inputs)  # the first call per shape picks the Hopper kernel path (cached)
        assert torch.equal(fast(**inputs).sample, old(**inputs).sample)
    monkeypatch.delenv("QCONVERT_FAST_LOAD")
    fast_p = load_pipeline(converted[fmt], device="cuda")
    monkeypatch.setenv("QCONVERT_FAST_LOAD", "0")
    old_p = load_pipeline(converted[fmt], device="cuda")
    same_model(fast_p.transformer, old_p.transformer.eval())
    for name, part in old_p.components.items():
        if isinstance(part, torch.nn.Module) and name != "transformer":
            # The fast path loads these with device_map="cuda" (straight to the GPU); the
            # compatibility path loaded them on the CPU and moved them: same weights, but the
            # loaders leave different bookkeeping (hf_device_map, ...).
            same_weights(fast_p.components[name], part, name)
