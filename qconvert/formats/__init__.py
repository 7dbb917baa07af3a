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
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

from qconvert.errors import QconvertError
from qconvert.formats import fastquant
from qconvert.formats.reference import (
    fp8_config,
    mxfp8_config,
    nvfp4_config,
    quantize_fp8,
    quantize_mxfp8,
    quantize_nvfp4,
)


class FormatError(QconvertError, ValueError):
    """A weight that a format cannot represent (bad shape, dtype or values)."""


Spec = tuple[torch.dtype, tuple[int, ...]]


def _blocked_pieces(
    qdata: torch.dtype, bits: int, scale: torch.dtype, block: int, per_tensor: bool
) -> Callable[[tuple[int, ...]], dict[str, Spec]]:
    """NVFP4 / MX: block scales stored swizzled — the (rows, K/block) scale matrix padded to
    multiples of (128, 4) and kept as (padded_rows / 4, padded_cols * 4), what torchao's
    to_blocked returns."""

    def pieces(shape: tuple[int, ...]) -> dict[str, Spec]:
        out_f, in_f = shape
        rows = -(-out_f // 128) * 128
        cols = -(-(in_f // block) // 4) * 4
        out: dict[str, Spec] = {
            "qdata": (qdata, (out_f, in_f * bits // (8 * qdata.itemsize))),
            "scale": (scale, (rows // 4, cols * 4)),
        }
        if per_tensor:
            out["per_tensor_scale"] = (torch.float32, ())
        return out

    return pieces


def _rowwise_pieces(shape: tuple[int, ...]) -> dict[str, Spec]:
    """fp8 rowwise: e4m3 qdata and one fp32 scale per output row."""
    out_f, in_f = shape
    return {"qdata": (torch.float8_e4m3fn, (out_f, in_f)), "scale": (torch.float32, (out_f, 1))}


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
    # The tensors one weight of a shape flattens to: {suffix: (dtype, shape)};
    # ``blk.lin.weight`` is saved as ``blk.lin._weight_<suffix>``.
    pieces: Callable[[tuple[int, ...]], dict[str, Spec]]

    def shape_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why a Linear weight of this shape cannot take the format, or None when it can."""
        if len(shape) != 2:
            return f"{self.name} takes 2-D Linear weights, got shape {list(shape)}"
        for dim, size, multiple in zip(("out", "in"), shape, self.multiple_of, strict=True):
            if size % multiple:
                return f"{dim}_features {size} not divisible by {multiple} ({self.name} block rule)"
        return None

    def quantize(
        self, weight: torch.Tensor, name: str = "weight", fast: bool = True
    ) -> torch.Tensor:
        """The exact tensor torchao's quantize_ builds for this format's config.

        ``weight`` must be a finite bf16 2-D tensor; ``name`` is used in error messages.
        ``fast`` uses qconvert's CPU quantizer where there is one (bit-identical, tested);
        otherwise torchao's own construction runs.
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
        builder = FAST_CPU_BUILDERS.get(self.name) if fast and weight.device.type == "cpu" else None
        quantized = (builder or self.build)(weight)
        if not scales_are_finite(quantized):
            raise FormatError(
                f"{name}: torchao's {self.name} construction gives NaN/Inf scales for this weight "
                f"(an all-zero {'row' if self.name == 'fp8' else 'tensor'}, or values below "
                f"~1e-35); keep this layer in bf16 with --skip {name}"
            )
        return quantized

    def tensor_metadata(self, shape: tuple[int, ...]) -> str:
        """The torchao safetensors metadata JSON for one weight of this shape.

        It never depends on values; for fp8 it records the row length (``block_size``).
        Built from a real (small) tensor, so it is what torchao writes.
        """
        return _metadata_of(self.name, int(shape[-1]) if self.name == "fp8" else 0)

    def tensor_type(self) -> str:
        """The torchao subclass this format's weights are, e.g. "NVFP4Tensor"."""
        return tensor_type_of(self.tensor_metadata((128, 128)))

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
        build=quantize_nvfp4,
        pieces=_blocked_pieces(torch.uint8, 4, torch.float8_e4m3fn, 16, per_tensor=True),
    ),
    "mxfp8": Format(
        name="mxfp8",
        description="MXFP8: e4m3 elements, e8m0 scale per 32 (RCEIL)",
        block_size=32,
        multiple_of=(1, 32),
        bits_per_element=8.25,
        config=mxfp8_config,
        build=quantize_mxfp8,
        pieces=_blocked_pieces(torch.float8_e4m3fn, 8, torch.float8_e8m0fnu, 32, per_tensor=False),
    ),
    "fp8": Format(
        name="fp8",
        description="FP8 rowwise: e4m3 elements, fp32 scale per output row",
        block_size=0,
        multiple_of=(16, 16),
        bits_per_element=8.0,
        config=fp8_config,
        build=quantize_fp8,
        pieces=_rowwise_pieces,
    ),
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}") from None


def scales_are_finite(quantized: torch.Tensor) -> bool:
    """Whether a quantized weight dequantizes without NaN: torchao stores NaN block scales for
    an all-zero NVFP4 tensor and NaN elements for an all-zero FP8 row (0/0). Reads the scales,
    and for FP8 the e4m3 data (one byte compare per element)."""

    def e4m3_nan(t: torch.Tensor) -> bool:
        return bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())

    scale = quantized.scale
    if scale.dtype == torch.float8_e4m3fn and e4m3_nan(scale):
        return False
    if scale.dtype == torch.float8_e8m0fnu and bool((scale.view(torch.uint8) == 0xFF).any()):
        return False
    if scale.dtype == torch.float32:
        if not bool(torch.isfinite(scale).all()) or e4m3_nan(quantized.qdata):
            return False
    per_tensor = getattr(quantized, "per_tensor_scale", None)
    return per_tensor is None or bool(torch.isfinite(per_tensor).all())


# qconvert's vectorized CPU quantizers (same bytes as the reference, tested), by format.
FAST_CPU_BUILDERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "nvfp4": fastquant.quantize_nvfp4,
    "mxfp8": fastquant.quantize_mxfp8,
}


_METADATA_CACHE: dict[tuple[str, int], str] = {}


def _metadata_of(name: str, row_length: int) -> str:
    key = (name, row_length)
    if key not in _METADATA_CACHE:
        probe = FORMATS[name].build(torch.zeros(128, row_length or 128, dtype=torch.bfloat16))
        _, metadata = flatten_tensor_state_dict({"probe.weight": probe})
        _METADATA_CACHE[key] = metadata["probe.weight"]
    return _METADATA_CACHE[key]


def tensor_type_of(metadata_json: str) -> str:
    """The torchao subclass name recorded in one tensor's safetensors metadata."""
    return str(json.loads(metadata_json).get("_type"))
