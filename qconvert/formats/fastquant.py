"""Fast CPU quantizers that build byte-identical NVFP4 / MXFP8 tensors to torchao's.

``FORMATS[fmt].build`` (the reference) runs torchao's own construction, which makes many
full-size fp32/int32 temporaries; on the 2-core runner it does ~15-50 M elements/s
(NVFP4) and ~170-200 M elements/s (MXFP8). The functions here return the same tensors
(qdata bytes, scale bytes, per-tensor scale, every attribute) 4-15x faster, in plain torch:

* The weight is read as a flat run of blocks, in chunks that stay in cache, and written
  into preallocated outputs (a handful of in-place ops per chunk, no full-size temps).
* Block maxima are taken on the bf16 bit patterns: ``bits & 0x7FFF`` clears the sign, and
  for non-negative floats integer order is value order, so an int16 ``amax`` gives the
  bit pattern of ``amax(abs(x))`` (NaN patterns sort above inf, so they are seen too).
* Every per-block quantity (e4m3 block scale and reciprocal for NVFP4, e8m0 exponent and
  reciprocal for MXFP8) depends only on the block maximum, a non-negative bf16 value: at
  most 2**15 of them. They are computed for a table with torchao's own op sequence, then
  gathered by the block-max bit pattern.
* e2m1 rounding goes through a 2**16-entry table indexed by the fp32 product rounded to
  bf16 with round-to-odd (see ``_e2m1_keys``), which keeps every rounding decision.

Inputs the fast path does not reproduce (not a contiguous non-empty bf16 2-D CPU tensor,
non-finite values, or tensors so small that torchao's reciprocal overflows and produces
NaN codes, the all-zero tensor among them) are handed to the reference itself, so the
result always equals ``FORMATS[fmt].build(w)``. ``tests/test_fastquant.py`` checks this
byte for byte, including every possible block maximum and every bf16 element value.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator

import torch
from torchao.prototype.mx_formats.config import ScaleCalculationMode
from torchao.prototype.mx_formats.constants import F4_E2M1_MAX, F8E4M3_MAX
from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked
from torchao.prototype.mx_formats.mx_tensor import MXTensor
from torchao.prototype.mx_formats.nvfp4_tensor import (
    E4M3_EPS,
    NVFP4Tensor,
    per_tensor_amax_to_scale,
)

from qconvert.formats.reference import (
    mxfp8_act_quant_kwargs,
    mxfp8_config,
    nvfp4_act_quant_kwargs,
    nvfp4_config,
)
from qconvert.formats.reference import (
    quantize_mxfp8 as _quantize_mxfp8,
)
from qconvert.formats.reference import (
    quantize_nvfp4 as _quantize_nvfp4,
)

NVFP4_BLOCK = 16
MX_BLOCK = 32
E8M0_BIAS = 127
# Elements per chunk. Each op on a chunk is one OpenMP region over both cores, so chunks
# are big enough to keep that overhead (and stalls when a core is shared) small, and small
# enough to stay in L2/L3 with their fp32/int32 scratch: 256 Ki - 512 Ki measured best.
CHUNK_ELEMENTS = 1 << 19
# bf16 bit patterns at or above this (sign cleared) are inf or NaN.
_BF16_INF_BITS = 0x7F80


def _bf16_values(n: int) -> torch.Tensor:
    """The fp32 values of the non-negative bf16 bit patterns 0 .. n-1 (n <= 2**15)."""
    return torch.arange(n, dtype=torch.int16).view(torch.bfloat16).float()


def _chunk_blocks(block: int) -> int:
    return max(1, CHUNK_ELEMENTS // block)


def _chunks(n_blocks: int, block: int) -> Iterator[tuple[int, int]]:
    """[b0, b1) block ranges of about CHUNK_ELEMENTS elements.

    A contiguous (M, K) weight is a flat run of (M * K / block) blocks, so chunks need not
    follow rows: same chunk size whatever K is.
    """
    step = _chunk_blocks(block)
    for b0 in range(0, n_blocks, step):
        yield b0, min(n_blocks, b0 + step)


def _fast_path_applies(w: torch.Tensor, block: int) -> bool:
    """A contiguous, non-empty bf16 2-D CPU tensor (or Parameter) with whole blocks."""
    return (
        sys.byteorder == "little"  # the int16 views of bf16 / uint8 pairs assume it
        and type(w) in (torch.Tensor, torch.nn.Parameter)
        and w.dtype == torch.bfloat16
        and w.dim() == 2
        and w.device.type == "cpu"
        and w.numel() > 0
        and w.shape[1] % block == 0
        and w.is_contiguous()
    )


def _block_max_bits(blocks: torch.Tensor) -> torch.Tensor:
    """(n_blocks,) int16 bit patterns of ``amax(abs(block))`` for bf16 (n_blocks, block).

    Clearing the sign bits and taking an integer max is exact (non-negative floats sort
    like their bit patterns) and about 3x faster than ``abs`` + ``amax`` on bf16.
    """
    n_blocks, block = blocks.shape
    bits = blocks.view(torch.int16)
    out = torch.empty(n_blocks, dtype=torch.int16)
    scratch = torch.empty(min(n_blocks, _chunk_blocks(block)), block, dtype=torch.int16)
    for b0, b1 in _chunks(n_blocks, block):
        mag = torch.bitwise_and(bits[b0:b1], 0x7FFF, out=scratch[: b1 - b0])
        torch.amax(mag, dim=-1, out=out[b0:b1])
    return out


def _to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """torchao's ``to_blocked`` swizzle, flattened: one pad and one permuted copy.

    Pad to 128 rows x a multiple of 4 columns; output element [rb, cb, j, i, c] is
    ``padded[rb*128 + i*32 + j, cb*4 + c]`` (the cuBLAS block-scaling layout).
    """
    rows, cols = scales.shape
    n_rb, n_cb = -(-rows // 128), -(-cols // 4)
    padded = scales
    if (rows, cols) != (n_rb * 128, n_cb * 4):
        padded = torch.zeros(n_rb * 128, n_cb * 4, dtype=scales.dtype)
        padded[:rows, :cols] = scales
    return padded.view(n_rb, 4, 32, n_cb, 4).permute(0, 3, 2, 1, 4).reshape(-1)


# ---------------------------------------------------------------------------- NVFP4


@functools.cache
def _e2m1_table() -> torch.Tensor:
    """uint8 e2m1 code (sign included) for each round-to-odd bf16 key, via torchao's code.

    Entry ``k`` is ``f32_to_f4_unpacked(clamp(v, -6, 6))`` for the bf16 value with bits
    ``k``; ``_e2m1_keys`` explains why that equals the code of the fp32 value itself.
    """
    keys = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    vals = torch.clamp(keys.float(), -F4_E2M1_MAX, F4_E2M1_MAX)
    return f32_to_f4_unpacked(vals)


def _e2m1_keys(bits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Round fp32 bit patterns to bf16 with round-to-odd; return the 16-bit keys.

    key = high 16 bits, with bit 0 OR-ed with "any low 16 bit set" (the sticky bit:
    ``(low + 0xFFFF)`` carries into bit 16 exactly when ``low != 0``). Every e2m1 decision
    point (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, the clamp at 6) is a bf16 value whose
    last mantissa bit is 0; a value strictly between two bf16 neighbours maps to the odd
    one of them, so it lands on the same side of every decision point and is never
    mistaken for a tie. The e2m1 code of the key therefore equals that of the fp32 value.
    Five in-place int32 ops; the final mask undoes the arithmetic shift's sign fill.
    """
    torch.bitwise_and(bits, 0xFFFF, out=out)
    out.add_(0xFFFF).bitwise_or_(bits).bitwise_right_shift_(16).bitwise_and_(0xFFFF)
    return out


def _nvfp4_block_tables(
    per_tensor_scale: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(e4m3 scale byte, fp32 reciprocal) per block-max bit pattern 0 .. top.

    Same op sequence as torchao's ``nvfp4_quantize`` two-level branch, on the possible
    block maxima instead of on every block (IEEE division, clamp and cast give the same
    bits either way). None when a reciprocal is not finite: torchao's products are then
    inf/NaN and their codes depend on NaN bit patterns (hardware and vector-width
    dependent), so the caller uses the reference instead.
    """
    block_scale = _bf16_values(top + 1) / F4_E2M1_MAX
    scaled = block_scale.to(torch.float32) / per_tensor_scale
    scale_fp8 = torch.clamp(scaled, min=E4M3_EPS, max=F8E4M3_MAX).to(torch.float8_e4m3fn)
    reciprocal = (1.0 / per_tensor_scale) / scale_fp8.to(torch.float32)
    if not bool(torch.isfinite(reciprocal).all()):
        return None
    return scale_fp8.view(torch.uint8), reciprocal


def quantize_nvfp4(w: torch.Tensor) -> NVFP4Tensor:
    """The NVFP4Tensor ``FORMATS["nvfp4"].build(w)`` returns, built several times faster.

    Two passes over ``w``: block maxima (which also give the per-tensor amax), then per
    chunk: fp32 product with the block reciprocal (exactly torchao's rounding), round-to-
    odd key, e2m1 table lookup, and nibble packing of two uint8 codes read as one int16.
    """
    if not _fast_path_applies(w, NVFP4_BLOCK):
        return _quantize_nvfp4(w)
    with torch.no_grad():
        m, k = w.shape
        blocks = w.detach().view(-1, NVFP4_BLOCK)
        n_blocks = blocks.shape[0]
        block_max = _block_max_bits(blocks)
        top = int(block_max.max())
        if top >= _BF16_INF_BITS:
            return _quantize_nvfp4(w)
        amax = torch.tensor(top, dtype=torch.int16).view(torch.bfloat16)
        per_tensor_scale = per_tensor_amax_to_scale(amax)
        tables = _nvfp4_block_tables(per_tensor_scale, top)
        if tables is None:
            return _quantize_nvfp4(w)
        scale_table, reciprocal_table = tables
        index = block_max.to(torch.int32)
        reciprocal = reciprocal_table.index_select(0, index).view(-1, 1)
        scale = scale_table.index_select(0, index)

        code_table = _e2m1_table()
        qdata = torch.empty(m, k // 2, dtype=torch.uint8)
        packed = qdata.view(-1, NVFP4_BLOCK // 2)
        size = min(n_blocks, _chunk_blocks(NVFP4_BLOCK)) * NVFP4_BLOCK
        prod = torch.empty(size, dtype=torch.float32)
        keys = torch.empty(size, dtype=torch.int32)
        codes = torch.empty(size, dtype=torch.uint8)
        shifted = torch.empty(size // 2, dtype=torch.int16)
        for b0, b1 in _chunks(n_blocks, NVFP4_BLOCK):
            n = (b1 - b0) * NVFP4_BLOCK
            torch.mul(blocks[b0:b1], reciprocal[b0:b1], out=prod[:n].view(-1, NVFP4_BLOCK))
            key = _e2m1_keys(prod[:n].view(torch.int32), keys[:n])
            code = torch.index_select(code_table, 0, key, out=codes[:n])
            # A code pair read as little-endian int16 is even | odd << 8; OR-ing in itself
            # >> 4 puts odd << 4 in the low byte, and the uint8 output keeps the low byte:
            # pack_uint4's byte, even | odd << 4.
            c16 = code.view(torch.int16)
            torch.bitwise_right_shift(c16, 4, out=shifted[: n // 2])
            torch.bitwise_or(c16, shifted[: n // 2], out=packed[b0:b1].view(-1))

        scale_m, scale_k = -(-m // 128) * 32, -(-k // 64) * 16
        swizzled = _to_blocked(scale.view(m, k // NVFP4_BLOCK)).view(torch.float8_e4m3fn)
        config = nvfp4_config()
        act_quant_kwargs = nvfp4_act_quant_kwargs()
        return NVFP4Tensor(
            qdata,
            swizzled.view(scale_m, scale_k),
            NVFP4_BLOCK,
            w.dtype,
            per_tensor_scale,
            None,
            True,
            config.use_triton_kernel,
            act_quant_kwargs,
        )


# ---------------------------------------------------------------------------- MXFP8


@functools.cache
def _mx_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """(e8m0 byte, bf16 reciprocal) per block-max bit pattern, RCEIL, e4m3 elements.

    The op sequence of torchao's ``_to_mx_rceil`` CPU fallback on all 2**15 non-negative
    bf16 values. For finite maxima the reciprocal is a power of two (or 1.0 for exponent
    0, torchao's special case), so it is exact in bf16 and ``x * reciprocal`` in bf16 is
    the fp32 product except below 2**-126, where both cast to a signed e4m3 zero; and
    ``|x| * reciprocal <= 448``, so torchao's clamp never changes a value.
    """
    max_abs = _bf16_values(1 << 15)
    descale = max_abs / F8E4M3_MAX
    exponent = torch.where(
        torch.isnan(descale),
        255,
        torch.where(
            torch.isinf(descale),
            254,
            (
                torch.clamp(torch.ceil(torch.log2(descale)), min=-E8M0_BIAS, max=E8M0_BIAS)
                + E8M0_BIAS
            ).to(torch.uint8),
        ),
    )
    reciprocal = torch.where(
        exponent == 255,
        descale,
        torch.where(
            exponent == 254,
            2**-127,
            torch.where(exponent == 0, 1.0, torch.exp2(E8M0_BIAS - exponent.to(torch.float32))),
        ),
    )
    finite = slice(0, _BF16_INF_BITS)
    reciprocal_bf16 = reciprocal.to(torch.bfloat16)
    # What the fast path relies on; a torch/torchao change that breaks it must not pass.
    if not (
        torch.equal(reciprocal_bf16[finite].float(), reciprocal[finite])
        and bool((max_abs[finite] * reciprocal[finite] <= F8E4M3_MAX).all())
    ):
        raise RuntimeError("torchao's MX RCEIL numerics changed; fastquant needs updating")
    return exponent, reciprocal_bf16


def quantize_mxfp8(w: torch.Tensor) -> MXTensor:
    """The MXTensor ``FORMATS["mxfp8"].build(w)`` returns, built several times faster.

    One pass over ``w`` in chunks: int16 block maxima, table lookup of the reciprocal,
    and a bf16 multiply written straight into the float8_e4m3fn output (torch's cast
    rounds to nearest even, as torchao's fp32 cast does).
    """
    config = mxfp8_config()
    if not (
        _fast_path_applies(w, MX_BLOCK)
        and config.block_size == MX_BLOCK
        and config.weight_dtype == torch.float8_e4m3fn
        and config.scaling_mode == ScaleCalculationMode.RCEIL
    ):
        return _quantize_mxfp8(w)
    with torch.no_grad():
        m, k = w.shape
        exponent_table, reciprocal_table = _mx_tables()
        blocks = w.detach().view(-1, MX_BLOCK)
        bits = blocks.view(torch.int16)
        n_blocks = blocks.shape[0]
        qdata = torch.empty(m, k, dtype=torch.float8_e4m3fn)
        out = qdata.view(-1, MX_BLOCK)
        block_max = torch.empty(n_blocks, dtype=torch.int16)
        step = min(n_blocks, _chunk_blocks(MX_BLOCK))
        mag = torch.empty(step, MX_BLOCK, dtype=torch.int16)
        index = torch.empty(step, dtype=torch.int32)
        reciprocal = torch.empty(step, dtype=torch.bfloat16)
        for b0, b1 in _chunks(n_blocks, MX_BLOCK):
            nb = b1 - b0
            a = torch.bitwise_and(bits[b0:b1], 0x7FFF, out=mag[:nb])
            bm = torch.amax(a, dim=-1, out=block_max[b0:b1])
            idx = index[:nb].copy_(bm)
            rc = torch.index_select(reciprocal_table, 0, idx, out=reciprocal[:nb])
            torch.mul(blocks[b0:b1], rc.view(-1, 1), out=out[b0:b1])
        if int(block_max.max()) >= _BF16_INF_BITS:
            return _quantize_mxfp8(w)

        scale = exponent_table.index_select(0, block_max.to(torch.int32))
        scale_m, scale_k = -(-m // 128) * 32, -(-k // 128) * 16
        swizzled = _to_blocked(scale.view(m, k // MX_BLOCK)).view(torch.float8_e8m0fnu)
        act_quant_kwargs = mxfp8_act_quant_kwargs()
        return MXTensor(
            qdata,
            swizzled.view(scale_m, scale_k),
            config.weight_dtype,
            config.block_size,
            w.dtype,
            config.kernel_preference,
            act_quant_kwargs,
            True,
        )
