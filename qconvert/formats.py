"""The quantized formats qconvert writes: one place for block sizes, shape rules and the
torchao construction each format stands for.

Every weight we write is the tensor torchao's own ``quantize_`` handler builds for the
format's config on the hardware the format is made for (``torchao/prototype/mx_formats/
inference_workflow.py``), reproduced step by step without the hardware assert so it runs on
any device. ``tests/test_formats.py`` proves bit-equality against the real handlers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchao.core.config import AOBaseConfig
from torchao.prototype.mx_formats.inference_workflow import (
    MXDynamicActivationMXWeightConfig,
    NVFP4DynamicActivationNVFP4WeightConfig,
)
from torchao.prototype.mx_formats.mx_tensor import MXTensor, QuantizeTensorToMXKwargs
from torchao.prototype.mx_formats.nvfp4_tensor import (
    NVFP4Tensor,
    QuantizeTensorToNVFP4Kwargs,
    per_tensor_amax_to_scale,
)
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict


class FormatError(ValueError):
    """A weight that a format cannot represent (bad shape, dtype or values)."""


def nvfp4_config() -> NVFP4DynamicActivationNVFP4WeightConfig:
    return NVFP4DynamicActivationNVFP4WeightConfig(
        use_dynamic_per_tensor_scale=True, use_triton_kernel=True
    )


def mxfp8_config() -> MXDynamicActivationMXWeightConfig:
    return MXDynamicActivationMXWeightConfig()


def _quantize_nvfp4(weight: torch.Tensor) -> NVFP4Tensor:
    # The dynamic branch of torchao's _nvfp4_inference_linear_transform, minus its sm100 assert.
    config = nvfp4_config()
    per_tensor_scale = per_tensor_amax_to_scale(torch.max(torch.abs(weight)))
    act_quant_kwargs = QuantizeTensorToNVFP4Kwargs(
        use_dynamic_per_tensor_scale=config.use_dynamic_per_tensor_scale,
        use_triton_kernel=config.use_triton_kernel,
        is_swizzled_scales=True,
    )
    quantized = NVFP4Tensor.to_nvfp4(
        weight,
        per_tensor_scale=per_tensor_scale,
        is_swizzled_scales=True,
        use_triton_kernel=False,
        act_quant_kwargs=act_quant_kwargs,
    )
    quantized.use_triton_kernel = config.use_triton_kernel
    return quantized


def _quantize_mxfp8(weight: torch.Tensor) -> MXTensor:
    # torchao's _mx_inference_linear_transform (it has no hardware assert; MX wants bf16).
    config = mxfp8_config()
    act_quant_kwargs = QuantizeTensorToMXKwargs(
        elem_dtype=config.activation_dtype,
        block_size=config.block_size,
        kernel_preference=config.kernel_preference,
        is_swizzled_scales=True,
        scaling_mode=config.scaling_mode,
    )
    return MXTensor.to_mx(
        weight,
        config.weight_dtype,
        block_size=config.block_size,
        kernel_preference=config.kernel_preference,
        act_quant_kwargs=act_quant_kwargs,
        is_swizzled_scales=True,
        scaling_mode=config.scaling_mode,
    )


@dataclass(frozen=True)
class Format:
    """A weight format: its torchao config, its block rules and how to build one weight."""

    name: str
    description: str
    block_size: int
    # Each weight dim (out_features, in_features) must be a multiple of these.
    multiple_of: tuple[int, int]
    # Storage bits per weight element, scales included (per-tensor scalars ignored).
    bits_per_element: float
    config: Callable[[], AOBaseConfig]
    build: Callable[[torch.Tensor], torch.Tensor]
    bits: int  # bits per element of qdata
    qdata_dtype: torch.dtype
    scale_dtype: torch.dtype
    per_tensor_scale: bool

    def shape_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why a Linear weight of this shape cannot take the format, or None when it can."""
        if len(shape) != 2:
            return f"{self.name} takes 2-D Linear weights, got shape {list(shape)}"
        for dim, size, multiple in zip(("out", "in"), shape, self.multiple_of, strict=True):
            if size % multiple:
                return f"{dim}_features {size} not divisible by {multiple} ({self.name} block rule)"
        return None

    def quantize(self, weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
        """The exact tensor torchao's quantize_ builds for this format's config.

        ``weight`` must be a finite bf16 2-D tensor; ``name`` is used in error messages.
        """
        problem = self.shape_problem(tuple(weight.shape))
        if problem:
            raise FormatError(f"{name}: {problem}")
        if weight.dtype != torch.bfloat16:
            raise FormatError(f"{name}: {self.name} quantizes bf16 weights, got {weight.dtype}")
        # aminmax propagates NaN and shows ±Inf, at ~30× the speed of isfinite().all() on bf16.
        lo, hi = torch.aminmax(weight) if weight.numel() else (torch.zeros(()), torch.zeros(()))
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            bad = int((~torch.isfinite(weight)).sum())
            raise FormatError(
                f"{name}: {bad} NaN/Inf value(s) in the weight; fix the source checkpoint "
                f"or keep this layer with --skip"
            )
        return self.build(weight)

    def tensor_metadata(self) -> str:
        """The torchao safetensors metadata JSON for one weight of this format.

        It depends only on the format (not on values or shape); built from a real tensor.
        """
        return _metadata_of(self.name)

    def pieces(self, shape: tuple[int, ...]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The tensors one weight of this shape flattens to: {suffix: (dtype, shape)}.

        ``blk.lin.weight`` is saved as ``blk.lin._weight_<suffix>``. Block scales are stored
        swizzled: the (rows, K/block) scale matrix padded to multiples of (128, 4), kept as
        (padded_rows / 4, padded_cols * 4) — what torchao's to_blocked returns.
        """
        out_f, in_f = shape
        rows = -(-out_f // 128) * 128
        cols = -(-(in_f // self.block_size) // 4) * 4
        return {
            "qdata": (
                self.qdata_dtype,
                (out_f, in_f * self.bits // (8 * self.qdata_dtype.itemsize)),
            ),
            "scale": (self.scale_dtype, (rows // 4, cols * 4)),
            **({"per_tensor_scale": (torch.float32, ())} if self.per_tensor_scale else {}),
        }

    def bytes_for(self, shape: tuple[int, ...]) -> int:
        """Bytes one weight of this shape takes on disk."""
        total = 0
        for dtype, piece in self.pieces(shape).values():
            n = 1
            for d in piece:
                n *= d
            total += n * dtype.itemsize
        return total


FORMATS: dict[str, Format] = {
    "nvfp4": Format(
        name="nvfp4",
        description="NVFP4: e2m1 elements, e4m3 scale per 16, fp32 per-tensor scale",
        block_size=16,
        multiple_of=(16, 16),
        bits_per_element=4.5,
        config=nvfp4_config,
        build=_quantize_nvfp4,
        bits=4,
        qdata_dtype=torch.uint8,
        scale_dtype=torch.float8_e4m3fn,
        per_tensor_scale=True,
    ),
    "mxfp8": Format(
        name="mxfp8",
        description="MXFP8: e4m3 elements, e8m0 scale per 32 (RCEIL)",
        block_size=32,
        multiple_of=(1, 32),
        bits_per_element=8.25,
        config=mxfp8_config,
        build=_quantize_mxfp8,
        bits=8,
        qdata_dtype=torch.float8_e4m3fn,
        scale_dtype=torch.float8_e8m0fnu,
        per_tensor_scale=False,
    ),
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}") from None


_METADATA_CACHE: dict[str, str] = {}


def _metadata_of(name: str) -> str:
    if name not in _METADATA_CACHE:
        probe = FORMATS[name].build(torch.zeros(128, 128, dtype=torch.bfloat16))
        _, metadata = flatten_tensor_state_dict({"probe.weight": probe})
        _METADATA_CACHE[name] = metadata["probe.weight"]
    return _METADATA_CACHE[name]


def tensor_type_of(metadata_json: str) -> str:
    """The torchao subclass name recorded in one tensor's safetensors metadata."""
    return str(json.loads(metadata_json).get("_type"))
