"""Each format builds exactly the tensor torchao's own quantize_ handler builds.

The reference is torchao's real module handler (``quantize_(linear, config)``) with its
hardware check patched to pass, so it runs on this CPU exactly as it would on Blackwell.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchao.prototype.mx_formats.inference_workflow as workflow
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
from torchao.quantization import quant_api, quantize_
from torchao_compare import assert_identical

from qconvert.formats import FAST_CPU_BUILDERS, FORMATS, FormatError, get_format, scales_are_finite


@pytest.fixture(autouse=True)
def _pretend_blackwell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workflow, "is_sm_at_least_100", lambda: True)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)


def torchao_reference(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.bfloat16)
    linear.weight.data.copy_(weight)
    quantize_(linear, FORMATS[fmt].config())
    return linear.weight


def nasty_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    zero_blocks = randn(256, 512)
    zero_blocks[:, :64] = 0
    zero_blocks[17, 100:132] = 0
    outlier = randn(256, 512) * 0.01
    outlier[3, 7] = 3.0e4
    subnormal = torch.full((128, 256), 1e-40).to(torch.bfloat16) * torch.sign(randn(128, 256))
    mixed = randn(128, 256)
    mixed[::2] *= 1e-30
    mixed[1::4] *= 1e30
    ties = (torch.arange(128 * 256) % 13 * 0.25 - 1.5).reshape(128, 256).to(torch.bfloat16)
    return {
        "random": randn(256, 512),
        "random_large_rows": randn(1040, 96),
        "all_zero": torch.zeros(128, 256, dtype=torch.bfloat16),
        "zero_blocks": zero_blocks,
        "huge": randn(128, 256) * 1e37,
        "tiny": randn(128, 256) * 1e-35,
        "subnormal": subnormal,
        "single_outlier": outlier,
        "mixed_magnitudes": mixed,
        "rounding_ties": ties,
        "negative_zero": -torch.zeros(128, 256, dtype=torch.bfloat16),
    }


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("case", sorted(nasty_weights()))
def test_bit_exact_with_torchao(fmt: str, case: str) -> None:
    weight = nasty_weights()[case]
    reference = torchao_reference(weight, fmt)
    if scales_are_finite(reference):
        assert_identical(FORMATS[fmt].quantize(weight, name=case), reference)
        return
    # torchao stores NaN scales here (all-zero NVFP4 tensor / FP8 rows): refused by name, and
    # the construction underneath is still torchao's, byte for byte.
    assert (fmt, case) in {(f, c) for f in ("nvfp4", "fp8") for c in ("all_zero", "negative_zero")}
    with pytest.raises(FormatError, match=f"{case}: torchao's {fmt} construction gives NaN"):
        FORMATS[fmt].quantize(weight, name=case)
    fast = FAST_CPU_BUILDERS.get(fmt, FORMATS[fmt].build)
    assert_identical(fast(weight), reference)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_zero_rows_and_tensors_are_refused(fmt: str) -> None:
    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    weight[3] = 0
    if fmt == "fp8":  # one all-zero output row: per-row scale 0 → NaN in torchao
        with pytest.raises(FormatError, match="all-zero row"):
            FORMATS[fmt].quantize(weight, name="l")
    else:  # NVFP4 blocks of zeros are fine; only an all-zero tensor has no scale
        FORMATS[fmt].quantize(weight, name="l")
        with pytest.raises(FormatError, match="all-zero tensor"):
            FORMATS[fmt].quantize(torch.zeros(64, 64, dtype=torch.bfloat16), name="l")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_with_layer_name(fmt: str, bad: float) -> None:
    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    weight[5, 9] = bad
    with pytest.raises(FormatError, match=r"blocks\.3\.attn\.to_q: 1 NaN/Inf"):
        FORMATS[fmt].quantize(weight, name="blocks.3.attn.to_q")


def test_shape_rules() -> None:
    nvfp4, mxfp8 = FORMATS["nvfp4"], FORMATS["mxfp8"]
    assert nvfp4.shape_problem((3072, 3072)) is None
    assert "in_features 40 not divisible by 16" in str(nvfp4.shape_problem((64, 40)))
    assert "out_features 24 not divisible by 16" in str(nvfp4.shape_problem((24, 64)))
    assert mxfp8.shape_problem((24, 64)) is None  # MX blocks run along K only
    assert "in_features 48 not divisible by 32" in str(mxfp8.shape_problem((64, 48)))
    with pytest.raises(FormatError, match="not divisible"):
        mxfp8.quantize(torch.zeros(64, 48, dtype=torch.bfloat16), name="x")
    with pytest.raises(FormatError, match="bf16"):
        mxfp8.quantize(torch.zeros(64, 64), name="x")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize(
    "shape", [(16, 16), (128, 256), (48, 1024), (1040, 96), (3072, 64), (130, 64), (3, 32)]
)
def test_size_estimate_is_exact(fmt: str, shape: tuple[int, int]) -> None:
    weight = torch.randn(*shape, dtype=torch.bfloat16)
    if FORMATS[fmt].shape_problem(shape):
        pytest.skip("shape not valid for this format")
    flat, _ = flatten_tensor_state_dict({"l.weight": FORMATS[fmt].quantize(weight)})
    assert FORMATS[fmt].bytes_for(shape) == sum(t.numel() * t.itemsize for t in flat.values())
    pieces = {f"l._weight_{k}": v for k, v in FORMATS[fmt].pieces(shape).items()}
    assert pieces == {k: (t.dtype, tuple(t.shape)) for k, t in flat.items()}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_metadata_is_what_torchao_writes(fmt: str) -> None:
    ref = torchao_reference(torch.randn(64, 64, dtype=torch.bfloat16), fmt)
    _, meta = flatten_tensor_state_dict({"l.weight": ref})
    assert FORMATS[fmt].tensor_metadata((64, 64)) == meta["l.weight"]
    assert json.loads(meta["l.weight"])["_type"] == type(ref).__name__


def test_unknown_format() -> None:
    with pytest.raises(
        FormatError, match="unknown format 'int3'; choose one of: nvfp4, mxfp8, fp8"
    ):
        get_format("int3")
