"""Hopper / Ampere (sm80–sm90) runtime for qconvert's NVFP4 and MXFP8 weights.

torchao runs ``NVFP4Tensor`` / ``MXTensor`` natively only on Blackwell. Here the weight stays
packed in GPU memory (4.5 / 8.25 bits per element) and activations stay bf16; two Triton paths
compute ``y = x @ dequant(W)^T + bias``:

- ``dequant_mm``: a bandwidth-bound kernel (``qconvert::hopper_dequant``) writes a transient
  bf16 copy of W, then cuBLAS multiplies (``F.linear``). Bit-exact with torchao's
  ``W.dequantize(torch.bfloat16)``; the bf16 copy lives only for the one call.
- ``fused``: a GEMM (``qconvert::hopper_fused_linear``) that decodes each weight tile inside the
  K loop and feeds bf16 tensor cores (``tl.dot``). The NVFP4 tile is decoded to the exact values
  ``e2m1 * e4m3 * 2^-9`` (representable in bf16 without rounding) by a few integer and one
  ``fma.bf16x2`` instruction per element pair (inline PTX); the fp32 per-tensor scale (times
  2^9) multiplies the fp32 accumulator. MXFP8: native e4m3 -> bf16 conversion times the e8m0
  scale (one ``fma.bf16x2`` per pair), bit-equal to torchao's bf16 dequantize.

``qconvert::hopper_linear`` (``HopperQuantLinear(impl="auto")``) times both paths on the first
call per (format, M bucket, N, K) and keeps the faster one. On the H100, dequantize + cuBLAS
wins for FLUX-sized M (4096-4608 rows: 1.07-1.11x the bf16 matmul), the fused kernel for
decode-like M (1-77 rows with N = 12288); see benchmarks/NOTES-gpu.md.

Load-time repacking (``pack_weight``): torchao stores block scales swizzled in the 128x4
blocked layout cuBLAS wants; we un-swizzle once to plain row-major ``[N, K / block]`` (the NVFP4
qdata is kept as is: ``uint8 [N, K/2]``, read as ``int32`` words of 8 elements). No bf16 weight
is kept.

This module imports without Triton or CUDA (CPU CI): the custom ops then run a pure-torch path
with the same numerics as the dequantize kernel.
"""

import functools
import logging
import os
import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchao.prototype.mx_formats.utils import from_blocked, to_blocked

from qconvert.loaders.compat import RuntimeLinear, SavedLayout, default_layout
from qconvert.loaders.triton_support import HAS_TRITON, tl, traceable_op, triton
from qconvert.loaders.triton_support import interpret as _interpret

_log = logging.getLogger(__name__)

NVFP4 = "nvfp4"
MXFP8 = "mxfp8"
BLOCK_SIZES = {NVFP4: 16, MXFP8: 32}


# ---------------------------------------------------------------------------------------------
# Load-time repacking (pure torch, any device)
# ---------------------------------------------------------------------------------------------


def unswizzle_scales(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of torchao's ``to_blocked``: 128x4-blocked scales -> row-major ``[rows, cols]``.

    torchao's own ``from_blocked``, made contiguous (the kernels read rows).
    """
    return from_blocked(blocked.contiguous(), rows, cols).contiguous()


@dataclass
class PackedWeight:
    """A quantized Linear weight in the layout the Hopper kernels read.

    nvfp4: ``qdata`` uint8 ``[N, K/2]`` (torchao's, 2 e2m1 per byte, low nibble first),
    ``scale`` float8_e4m3fn ``[N, K/16]`` row-major, ``tensor_scale`` fp32 ``[1]``.
    mxfp8: ``qdata`` float8_e4m3fn ``[N, K]``, ``scale`` uint8 (e8m0 bits) ``[N, K/32]``
    row-major, ``tensor_scale`` None.
    """

    fmt: str
    qdata: torch.Tensor
    scale: torch.Tensor
    tensor_scale: torch.Tensor | None
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        total = self.qdata.numel() * self.qdata.element_size()
        total += self.scale.numel() * self.scale.element_size()
        if self.tensor_scale is not None:
            total += self.tensor_scale.numel() * self.tensor_scale.element_size()
        return total


def _is_nvfp4(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "NVFP4Tensor"


def _is_mx(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "MXTensor"


def pack_weight(weight: torch.Tensor) -> PackedWeight:
    """Repack a torchao ``NVFP4Tensor`` / ``MXTensor`` Linear weight (one-time, at load).

    Reuses the qdata storage; only the (small) block scales are rewritten.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D Linear weight, got shape {list(weight.shape)}")
    n, k = (int(s) for s in weight.shape)
    if _is_nvfp4(weight):
        block = int(weight.block_size)
        if block != 16:
            raise ValueError(f"NVFP4 block size must be 16, got {block}")
        qdata = weight.qdata
        if qdata.dtype != torch.uint8 or tuple(qdata.shape) != (n, k // 2):
            raise ValueError(
                f"NVFP4 qdata must be uint8 [N, K/2] row-major, got {qdata.dtype} "
                f"{list(qdata.shape)}"
            )
        if k % 16 or n % 16:
            raise ValueError(f"NVFP4 needs both dims divisible by 16, got {[n, k]}")
        scale = weight.scale
        if weight.is_swizzled_scales:
            scale = unswizzle_scales(scale.view(torch.uint8), n, k // block)
        scale = scale.reshape(n, k // block).view(torch.float8_e4m3fn).contiguous()
        pts = weight.per_tensor_scale
        if pts is not None and pts.numel() != 1:
            raise ValueError("per-expert NVFP4 scales are not supported")
        tensor_scale = (
            torch.ones(1, dtype=torch.float32, device=qdata.device)
            if pts is None
            else pts.detach().reshape(1).to(torch.float32).clone()
        )
        return PackedWeight(NVFP4, qdata.contiguous(), scale, tensor_scale, n, k)
    if _is_mx(weight):
        block = int(weight.block_size)
        if block != 32:
            raise ValueError(f"MX block size must be 32, got {block}")
        if weight.elem_dtype != torch.float8_e4m3fn:
            raise ValueError(f"only MXFP8 e4m3 weights are supported, got {weight.elem_dtype}")
        qdata = weight.qdata
        if not qdata.is_contiguous() or tuple(qdata.shape) != (n, k):
            raise ValueError("MX qdata must be row-major [N, K]")
        if k % 32:
            raise ValueError(f"MX needs in_features divisible by 32, got {k}")
        scale = weight.scale.view(torch.uint8)
        if weight.is_swizzled_scales:
            scale = unswizzle_scales(scale, n, k // block)
        scale = scale.reshape(n, k // block).contiguous()
        return PackedWeight(MXFP8, qdata, scale, None, n, k)
    raise TypeError(f"expected an NVFP4Tensor or MXTensor weight, got {type(weight).__name__}")


# ---------------------------------------------------------------------------------------------
# Pure-torch reference (CPU fallback; same numerics as the dequantize kernel)
# ---------------------------------------------------------------------------------------------

_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _dequant_torch(
    qdata: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor | None, fmt: str
) -> torch.Tensor:
    n = qdata.shape[0]
    if fmt == NVFP4:
        k = qdata.shape[1] * 2
        lut = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=qdata.device)
        lut = torch.cat([lut, -lut])
        nib = torch.stack([qdata & 0xF, qdata >> 4], dim=-1).reshape(n, k).long()
        vals = lut[nib].view(n, k // 16, 16)
        s = scale.view(torch.float8_e4m3fn).to(torch.float32)
        if tensor_scale is not None:
            s = tensor_scale.reshape(()) * s
        return (vals * s.unsqueeze(-1)).view(n, k).to(torch.bfloat16)
    if fmt == MXFP8:
        k = qdata.shape[1]
        e = scale.view(torch.uint8).to(torch.int32)
        s = torch.pow(torch.full_like(e, 2, dtype=torch.float32), (e - 127).float())
        s = torch.where(e == 255, torch.full_like(s, float("nan")), s)
        vals = qdata.view(torch.float8_e4m3fn).to(torch.float32).view(n, k // 32, 32)
        return (vals * s.unsqueeze(-1)).view(n, k).to(torch.bfloat16)
    raise ValueError(f"unknown format {fmt!r}")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _e4m3_bits_to_f32(b):
        """uint8/int32 e4m3 bit patterns -> exact fp32 (via fp16 bits; NaN kept)."""
        b = b.to(tl.int32) & 0xFF
        em = b & 0x7F
        bits = ((b & 0x80) << 8) | (em << 7)
        f = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
        return tl.where(em == 0x7F, float("nan"), f)

    @triton.jit
    def _e8m0_bits_to_f32(e):
        e = e.to(tl.int32) & 0xFF
        bits = tl.where(e == 0, 0x00400000, tl.where(e == 255, 0x7FC00000, e << 23))
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _e8m0_bits_to_bf16(e):
        e = e.to(tl.int32) & 0xFF
        bits = tl.where(e == 0, 0x0040, tl.where(e == 255, 0x7FC0, e << 7))
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _e2m1_nibble_to_f32(nib):
        """e2m1 nibble (int32, 0..15) -> exact fp32, via the fp16 bit pattern times 2^14."""
        bits = ((nib & 8) << 12) | ((nib & 7) << 9)
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0

    @triton.jit
    def _interleave8(o0, o1, o2, o3, o4, o5, o6, o7):
        """[R, W] x 8 -> [R, 8W] with element (r, 8w + j) = o_j[r, w]."""
        a = tl.interleave(tl.interleave(o0, o4), tl.interleave(o2, o6))
        b = tl.interleave(tl.interleave(o1, o5), tl.interleave(o3, o7))
        return tl.interleave(a, b)

    @triton.jit
    def _nvfp4_decode_asm(words, scale_bf16):
        """8 e2m1 per int32 word -> 8 bf16 ``e2m1 * scale_bf16 * 2^-126``, exact.

        Pairs of words are processed by one asm instance (``pack=2``); output half h of every
        bf16x2 register depends only on input word h, as Triton's elementwise contract needs.
        A nibble ``s e1 e0 m`` is moved to bf16 bits 15 / 8,7 / 6 (a bf16 worth
        ``value * 2^-126``, subnormal for 0.5) and one ``fma.rn.bf16x2`` multiplies by the
        block scale, exactly (e2m1 * e4m3 has at most 5 significant bits).
        """
        return tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 lo, hi, t, s, nz;
            mov.b32 nz, 0x80008000;
            prmt.b32 lo, $8, $9, 0x5410;
            prmt.b32 hi, $8, $9, 0x7632;
            shl.b32 t, lo, 6;
            and.b32 t, t, 0x01C001C0;
            shl.b32 s, lo, 12;
            lop3.b32 t, t, s, 0x80008000, 0xF8;
            fma.rn.bf16x2 $0, t, $10, nz;
            shl.b32 t, lo, 2;
            and.b32 t, t, 0x01C001C0;
            shl.b32 s, lo, 8;
            lop3.b32 t, t, s, 0x80008000, 0xF8;
            fma.rn.bf16x2 $1, t, $10, nz;
            shr.b32 t, lo, 2;
            and.b32 t, t, 0x01C001C0;
            shl.b32 s, lo, 4;
            lop3.b32 t, t, s, 0x80008000, 0xF8;
            fma.rn.bf16x2 $2, t, $10, nz;
            shr.b32 t, lo, 6;
            and.b32 t, t, 0x01C001C0;
            lop3.b32 t, t, lo, 0x80008000, 0xF8;
            fma.rn.bf16x2 $3, t, $10, nz;
            shl.b32 t, hi, 6;
            and.b32 t, t, 0x01C001C0;
            shl.b32 s, hi, 12;
            lop3.b32 t, t, s, 0x80008000, 0xF8;
            fma.rn.bf16x2 $4, t, $10, nz;
            shl.b32 t, hi, 2;
            and.b32 t, t, 0x01C001C0;
            shl.b32 s, hi, 8;
            lop3.b32 t, t, s, 0x80008000, 0xF8;
            fma.rn.bf16x2 $5, t, $10, nz;
            shr.b32 t, hi, 2;
            and.b32 t, t, 0x01C001C0;
            shl.b32 s, hi, 4;
            lop3.b32 t, t, s, 0x80008000, 0xF8;
            fma.rn.bf16x2 $6, t, $10, nz;
            shr.b32 t, hi, 6;
            and.b32 t, t, 0x01C001C0;
            lop3.b32 t, t, hi, 0x80008000, 0xF8;
            fma.rn.bf16x2 $7, t, $10, nz;
            }
            """,
            constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r,r",
            args=[words, scale_bf16],
            dtype=(
                tl.bfloat16,
                tl.bfloat16,
                tl.bfloat16,
                tl.bfloat16,
                tl.bfloat16,
                tl.bfloat16,
                tl.bfloat16,
                tl.bfloat16,
            ),
            is_pure=True,
            pack=2,
        )

    @triton.jit
    def _bf16_mul_asm(a, b):
        """Exact-rounded bf16 product (one fma.rn.bf16x2 per element pair)."""
        return tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 nz;
            mov.b32 nz, 0x80008000;
            fma.rn.bf16x2 $0, $1, $2, nz;
            }
            """,
            constraints="=r,r,r",
            args=[a, b],
            dtype=tl.bfloat16,
            is_pure=True,
            pack=2,
        )

    @triton.jit
    def _nvfp4_tile_fused(
        q_ptr, s_ptr, offs_n, k0, N, K,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
        USE_ASM: tl.constexpr,
    ):  # fmt: skip
        """Decoded NVFP4 weight tile [BLOCK_N, BLOCK_K] bf16, worth ``W / (pts * 2^9)``."""
        KW = K // 8  # int32 words per row
        KS = K // 16  # scales per row
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        offs_s = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        n_ok = offs_n[:, None] < N
        if EVEN_K:
            w_mask = n_ok
            s_mask = n_ok
        else:
            w_mask = n_ok & (offs_w[None, :] < KW)
            s_mask = n_ok & (offs_s[None, :] < KS)
        words = tl.load(q_ptr + offs_n[:, None] * KW + offs_w[None, :], mask=w_mask, other=0)
        sb = tl.load(s_ptr + offs_n[:, None] * KS + offs_s[None, :], mask=s_mask, other=0)
        s32 = _e4m3_bits_to_f32(sb)  # [BN, BK/16]
        if USE_ASM:
            s16 = (s32 * 1.661534994731144841e35).to(tl.bfloat16)  # * 2^117, exact
            s16 = tl.reshape(
                tl.broadcast_to(s16[:, :, None], (BLOCK_N, BLOCK_K // 16, 2)),
                (BLOCK_N, BLOCK_K // 8),
            )
            o0, o1, o2, o3, o4, o5, o6, o7 = _nvfp4_decode_asm(words, s16)
        else:
            s5 = s32 * 32.0  # 2^-14 (fp16 trick) * 2^5 = 2^-9
            s5 = tl.reshape(
                tl.broadcast_to(s5[:, :, None], (BLOCK_N, BLOCK_K // 16, 2)),
                (BLOCK_N, BLOCK_K // 8),
            )
            o0 = _nvfp4_pure_one(words, 0, s5)
            o1 = _nvfp4_pure_one(words, 4, s5)
            o2 = _nvfp4_pure_one(words, 8, s5)
            o3 = _nvfp4_pure_one(words, 12, s5)
            o4 = _nvfp4_pure_one(words, 16, s5)
            o5 = _nvfp4_pure_one(words, 20, s5)
            o6 = _nvfp4_pure_one(words, 24, s5)
            o7 = _nvfp4_pure_one(words, 28, s5)
        return _interleave8(o0, o1, o2, o3, o4, o5, o6, o7)

    @triton.jit
    def _nvfp4_pure_one(words, shift: tl.constexpr, s5):
        """Nibble at ``shift`` of each word -> bf16 ``e2m1 * s5 * 2^-14`` (exact)."""
        nib = (words >> shift) & 0xF
        bits = ((nib & 8) << 12) | ((nib & 7) << 9)
        v = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return (v * s5).to(tl.bfloat16)

    @triton.jit
    def _mxfp8_tile_fused(
        q_ptr, s_ptr, offs_n, k0, N, K,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
        USE_ASM: tl.constexpr, FP8_NATIVE: tl.constexpr,
    ):  # fmt: skip
        """Decoded MXFP8 weight tile [BLOCK_N, BLOCK_K] bf16 (bit-equal to torchao's)."""
        KS = K // 32
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_s = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        n_ok = offs_n[:, None] < N
        if EVEN_K:
            q_mask = n_ok
            s_mask = n_ok
        else:
            q_mask = n_ok & (offs_k[None, :] < K)
            s_mask = n_ok & (offs_s[None, :] < KS)
        qb = tl.load(q_ptr + offs_n[:, None] * K + offs_k[None, :], mask=q_mask, other=0)
        eb = tl.load(s_ptr + offs_n[:, None] * KS + offs_s[None, :], mask=s_mask, other=127)
        if FP8_NATIVE:
            q16 = qb.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
        else:
            q16 = _e4m3_bits_to_f32(qb).to(tl.bfloat16)
        q16 = tl.reshape(q16, (BLOCK_N, BLOCK_K // 32, 32))
        if USE_ASM:
            s16 = tl.broadcast_to(_e8m0_bits_to_bf16(eb)[:, :, None], (BLOCK_N, BLOCK_K // 32, 32))
            w = _bf16_mul_asm(q16, s16)
        else:
            w = (q16.to(tl.float32) * _e8m0_bits_to_f32(eb)[:, :, None]).to(tl.bfloat16)
        return tl.reshape(w, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _fused_linear_kernel(
        x_ptr, q_ptr, s_ptr, ts_ptr, b_ptr, y_ptr,
        M, N, K, stride_xm, stride_ym,
        FMT: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr,
        FP8_NATIVE: tl.constexpr, DOT_F32: tl.constexpr,
    ):  # fmt: skip
        """y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias), weight tiles decoded in the K loop.

        SWAP computes the transposed tile ``W_tile @ x_tile^T`` so that the weight fills the
        MMA's M side: what small M (decode-like) calls want.
        """
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_pid_n
        first_m = (pid // group) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % group) % group_m)
        pid_n = (pid % group) // group_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_kx = tl.arange(0, BLOCK_K)
        m_ok = offs_m[:, None] < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_kx[None, :]
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=m_ok, other=0.0)
            else:
                x = tl.load(x_ptrs, mask=m_ok & (offs_kx[None, :] + k0 < K), other=0.0)
            if FMT == 0:
                w = _nvfp4_tile_fused(
                    q_ptr, s_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K, EVEN_K, USE_ASM
                )
            else:
                w = _mxfp8_tile_fused(
                    q_ptr,
                    s_ptr,
                    offs_n,
                    k0,
                    N,
                    K,
                    BLOCK_N,
                    BLOCK_K,
                    EVEN_K,
                    USE_ASM,
                    FP8_NATIVE,
                )
            if DOT_F32:  # the CPU interpreter has no bf16 dot
                xa = x.to(tl.float32)
                wa = w.to(tl.float32)
                if SWAP:
                    acc = tl.dot(wa, tl.trans(xa), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xa, tl.trans(wa), acc, input_precision="ieee")
            else:
                if SWAP:
                    acc = tl.dot(w, tl.trans(x), acc)
                else:
                    acc = tl.dot(x, tl.trans(w), acc)
            x_ptrs += BLOCK_K

        if SWAP:
            acc = tl.trans(acc)
        if FMT == 0:
            acc = acc * (tl.load(ts_ptr) * 512.0)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)
            acc = acc + bias.to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(tl.bfloat16), mask=m_ok & (offs_n[None, :] < N))

    @triton.jit
    def _dequant_kernel(
        q_ptr, s_ptr, ts_ptr, out_ptr, N, K,
        FMT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
        FP8_NATIVE: tl.constexpr,
    ):  # fmt: skip
        """out[N, K] bf16 = torchao's ``dequantize(torch.bfloat16)``, bit for bit."""
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r[:, None] < N
        if FMT == 0:
            KW = K // 8
            KS = K // 16
            offs_w = pid_c * (BLOCK_C // 8) + tl.arange(0, BLOCK_C // 8)
            offs_s = pid_c * (BLOCK_C // 16) + tl.arange(0, BLOCK_C // 16)
            words = tl.load(
                q_ptr + offs_r[:, None] * KW + offs_w[None, :],
                mask=r_ok & (offs_w[None, :] < KW),
                other=0,
            )
            sb = tl.load(
                s_ptr + offs_r[:, None] * KS + offs_s[None, :],
                mask=r_ok & (offs_s[None, :] < KS),
                other=0,
            )
            # torchao: data_f32 * (per_tensor_scale * scale_e4m3.float()), then .to(bf16)
            comb = tl.load(ts_ptr) * _e4m3_bits_to_f32(sb)  # [R, C/16]
            comb = tl.reshape(
                tl.broadcast_to(comb[:, :, None], (BLOCK_R, BLOCK_C // 16, 2)),
                (BLOCK_R, BLOCK_C // 8),
            )
            o0 = (_e2m1_nibble_to_f32(words & 0xF) * comb).to(tl.bfloat16)
            o1 = (_e2m1_nibble_to_f32((words >> 4) & 0xF) * comb).to(tl.bfloat16)
            o2 = (_e2m1_nibble_to_f32((words >> 8) & 0xF) * comb).to(tl.bfloat16)
            o3 = (_e2m1_nibble_to_f32((words >> 12) & 0xF) * comb).to(tl.bfloat16)
            o4 = (_e2m1_nibble_to_f32((words >> 16) & 0xF) * comb).to(tl.bfloat16)
            o5 = (_e2m1_nibble_to_f32((words >> 20) & 0xF) * comb).to(tl.bfloat16)
            o6 = (_e2m1_nibble_to_f32((words >> 24) & 0xF) * comb).to(tl.bfloat16)
            o7 = (_e2m1_nibble_to_f32((words >> 28) & 0xF) * comb).to(tl.bfloat16)
            w = _interleave8(o0, o1, o2, o3, o4, o5, o6, o7)
        else:
            KS = K // 32
            offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
            offs_s = pid_c * (BLOCK_C // 32) + tl.arange(0, BLOCK_C // 32)
            qb = tl.load(
                q_ptr + offs_r[:, None] * K + offs_c[None, :],
                mask=r_ok & (offs_c[None, :] < K),
                other=0,
            )
            eb = tl.load(
                s_ptr + offs_r[:, None] * KS + offs_s[None, :],
                mask=r_ok & (offs_s[None, :] < KS),
                other=127,
            )
            if FP8_NATIVE:
                q32 = qb.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                q32 = _e4m3_bits_to_f32(qb)
            q32 = tl.reshape(q32, (BLOCK_R, BLOCK_C // 32, 32))
            w = (q32 * _e8m0_bits_to_f32(eb)[:, :, None]).to(tl.bfloat16)
            w = tl.reshape(w, (BLOCK_R, BLOCK_C))
        offs_out = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        tl.store(
            out_ptr + offs_r[:, None] * K + offs_out[None, :],
            w,
            mask=r_ok & (offs_out[None, :] < K),
        )


# ---------------------------------------------------------------------------------------------
# Launch wrappers, configs and a small autotuner of our own
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedConfig:
    """One tile shape of the fused kernel. ``swap`` computes ``W_tile @ x_tile^T``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap: bool = False
    group_m: int = 8

    @property
    def name(self) -> str:
        s = "swap-" if self.swap else ""
        return (
            f"{s}m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"
        )


# Large-M tiles (FLUX: M = 4096 + 512) and swapped tiles for small M. Swapped tiles put the
# decoded weight in the wgmma A operand, straight from registers (no shared-memory round trip).
FUSED_CONFIGS: tuple[FusedConfig, ...] = (
    FusedConfig(128, 256, 64, 8, 3),
    FusedConfig(256, 128, 64, 8, 3),
    FusedConfig(128, 128, 64, 4, 4),
    FusedConfig(128, 128, 128, 8, 3),
    FusedConfig(256, 128, 64, 8, 3, swap=True),
    FusedConfig(256, 128, 64, 8, 4, swap=True),
    FusedConfig(128, 128, 64, 8, 4, swap=True),
    FusedConfig(256, 64, 64, 4, 4, swap=True),
    FusedConfig(64, 128, 128, 4, 4),
    FusedConfig(64, 128, 128, 4, 4, swap=True),
    FusedConfig(32, 128, 128, 4, 4, swap=True),
    FusedConfig(16, 64, 256, 4, 4, swap=True),
    FusedConfig(16, 128, 128, 4, 4, swap=True),
)

# Dequantize kernel tiles: (rows, cols, warps).
DEQUANT_CONFIGS: tuple[tuple[int, int, int], ...] = (
    (32, 256, 4),
    (64, 256, 8),
    (16, 512, 4),
    (32, 512, 8),
    (64, 512, 8),
)

# Untuned choice (torch.compile, interpreter, CUDA-graph capture, QCONVERT_HOPPER_AUTOTUNE=0):
# fused up to this many rows, dequantize + cuBLAS above. On the H100 the fused kernel wins at
# M = 1 (N = 12288: 0.79x vs 2.39x bf16) and loses by 3x at M = 77, N = 3072 (NOTES-gpu.md).
DEFAULT_FUSED_MAX_M = 16


def _m_bucket(m: int) -> int:
    return min(1 << max(int(m) - 1, 0).bit_length(), 16384)


def candidate_configs(m: int) -> list[FusedConfig]:
    """The fused configs worth timing for ``m`` rows."""
    if m <= 16:
        return [c for c in FUSED_CONFIGS if c.swap and c.block_m == 16]
    if m <= 64:
        return [c for c in FUSED_CONFIGS if c.swap and c.block_m in (16, 32, 64)]
    if m <= 256:
        return [c for c in FUSED_CONFIGS if c.block_m in (64, 128)]
    return [c for c in FUSED_CONFIGS if c.block_m >= 128]


def default_config(m: int) -> FusedConfig:
    """The fused config used untuned."""
    if m <= 16:
        return FusedConfig(16, 128, 128, 4, 4, swap=True)
    if m <= 64:
        return FusedConfig(64, 128, 128, 4, 4, swap=True)
    return FusedConfig(256, 128, 64, 8, 3, swap=True)


_TUNED_FUSED: dict[tuple[Any, ...], FusedConfig] = {}
_TUNED_DEQUANT: dict[tuple[Any, ...], tuple[int, int, int]] = {}
_TUNED_PATH: dict[tuple[Any, ...], str] = {}
_USE_ASM = os.environ.get("QCONVERT_HOPPER_NO_ASM", "0") != "1"


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _fp8_native(device: torch.device) -> bool:
    if _interpret() or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 9)


def _check_triton(t: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("qconvert Hopper kernels need Triton (pip install triton)")
    if t.device.type != "cuda" and not _interpret():
        raise RuntimeError(f"qconvert Hopper kernels run on CUDA tensors, got {t.device}")


def _can_tune() -> bool:
    if _interpret() or os.environ.get("QCONVERT_HOPPER_AUTOTUNE", "1") == "0":
        return False
    return not torch.cuda.is_current_stream_capturing()


def bench_graph(fn: Any, calls: int = 10, replays: int = 7) -> float:
    """Median GPU milliseconds of one ``fn()``, timed over CUDA-graph replays of ``calls``
    back-to-back calls: launch overhead and host gaps excluded (L2 is not flushed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
        graph.replay()
        times = []
        for _ in range(replays):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    torch.cuda.current_stream().wait_stream(stream)
    del graph
    return float(statistics.median(times))


def _bench(fn: Any) -> float:
    """What the autotuner compares: GPU time per call (graph replays), else eager timing."""
    try:
        return bench_graph(fn)
    except Exception as exc:  # pragma: no cover - a capture refused; time eagerly instead
        _log.warning("graph timing failed (%s); timing eagerly", exc)
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def launch_dequant(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    fmt: str,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
    wrap: bool = False,
) -> torch.Tensor:
    """Run the dequantize kernel: packed weight -> bf16 ``[N, K]`` (``wrap``: launched through
    ``torch.library.wrap_triton``, as a triton_op body must)."""
    _check_triton(qdata)
    n, k = _shape_nk(qdata, fmt)
    if fmt == NVFP4:
        q = qdata.view(torch.int32)
        ts = tensor_scale if tensor_scale is not None else torch.ones(1, device=qdata.device)
    else:
        q = qdata.view(torch.uint8)
        ts = scale  # unused
    if out is None:
        out = torch.empty((n, k), dtype=torch.bfloat16, device=qdata.device)
    if config is None:
        config = _TUNED_DEQUANT.get((fmt, n, k), DEQUANT_CONFIGS[0])
    block_r, block_c, warps = config
    grid = (triton.cdiv(n, block_r), triton.cdiv(k, block_c))
    kernel = torch.library.wrap_triton(_dequant_kernel) if wrap else _dequant_kernel
    kernel[grid](
        q, scale.view(torch.uint8), ts, out, n, k,
        FMT=0 if fmt == NVFP4 else 1, BLOCK_R=block_r, BLOCK_C=block_c,
        FP8_NATIVE=_fp8_native(qdata.device), num_warps=warps,
    )  # fmt: skip
    return out


def launch_fused(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    config: FusedConfig,
    out: torch.Tensor | None = None,
    use_asm: bool | None = None,
) -> torch.Tensor:
    """Run the fused kernel with one given config; ``x`` is ``[M, K]`` with unit last stride."""
    _check_triton(x)
    m, k = x.shape
    n, kw = _shape_nk(qdata, fmt)
    if k != kw:
        raise ValueError(f"x has K={k}, weight has K={kw}")
    if fmt == NVFP4:
        q = qdata.view(torch.int32)
        ts = tensor_scale if tensor_scale is not None else torch.ones(1, device=x.device)
    else:
        q = qdata.view(torch.uint8)
        ts = x  # unused
    if out is None:
        out = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return out
    asm = (_USE_ASM if use_asm is None else use_asm) and not _interpret()
    c = config
    grid = (triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n),)
    _fused_linear_kernel[grid](
        x, q, scale.view(torch.uint8), ts, bias if bias is not None else x, out,
        m, n, k, x.stride(0), out.stride(0),
        FMT=0 if fmt == NVFP4 else 1, HAS_BIAS=bias is not None, SWAP=c.swap,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
        EVEN_K=k % c.block_k == 0, USE_ASM=asm, FP8_NATIVE=_fp8_native(x.device),
        DOT_F32=_interpret(), num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip
    return out


def tune_dequant(
    qdata: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor | None, fmt: str
) -> tuple[tuple[int, int, int], dict[str, float]]:
    """Time the dequantize tiles for this weight shape (median ms); cache the best."""
    n, k = _shape_nk(qdata, fmt)
    out = torch.empty((n, k), dtype=torch.bfloat16, device=qdata.device)
    times = {
        f"r{c[0]}c{c[1]}w{c[2]}": _bench(
            lambda c=c: launch_dequant(qdata, scale, tensor_scale, fmt, out, c)
        )
        for c in DEQUANT_CONFIGS
    }
    best = min(DEQUANT_CONFIGS, key=lambda c: times[f"r{c[0]}c{c[1]}w{c[2]}"])
    _TUNED_DEQUANT[(fmt, n, k)] = best
    return best, times


def tune_fused(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    configs: list[FusedConfig] | None = None,
) -> tuple[FusedConfig, dict[str, float]]:
    """Time the candidate configs for this shape (median ms); cache and return the best."""
    m, k = x.shape
    n = qdata.shape[0]
    out = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    times: dict[str, float] = {}
    best: FusedConfig | None = None
    for cfg in configs if configs is not None else candidate_configs(m):
        try:
            t = _bench(
                lambda cfg=cfg: launch_fused(x, qdata, scale, tensor_scale, bias, fmt, cfg, out)
            )
        except Exception as exc:  # e.g. out of shared memory on a smaller GPU
            times[cfg.name] = float("inf")
            _log.warning("config %s failed: %s: %s", cfg.name, type(exc).__name__, exc)
            continue
        times[cfg.name] = t
        if best is None or t < times[best.name]:
            best = cfg
    if best is None:
        raise RuntimeError(f"no fused config ran for M={m} N={n} K={k} ({fmt})")
    _TUNED_FUSED[_fused_key(x, n, bias, fmt)] = best
    return best, times


def _fused_key(x: torch.Tensor, n: int, bias: torch.Tensor | None, fmt: str) -> tuple[Any, ...]:
    return (fmt, _m_bucket(x.shape[0]), n, x.shape[1], bias is not None, x.device.index)


def _pick_config(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
) -> FusedConfig:
    cfg = _TUNED_FUSED.get(_fused_key(x, qdata.shape[0], bias, fmt))
    if cfg is not None:
        return cfg
    if not _can_tune():
        return default_config(x.shape[0])
    return tune_fused(x, qdata, scale, tensor_scale, bias, fmt)[0]


def _dequant_mm(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    w = launch_dequant(qdata, scale, tensor_scale, fmt)
    return F.linear(x, w, bias)


def choose_path(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
) -> tuple[str, dict[str, float]]:
    """Time fused (best config) against dequantize + cuBLAS for this shape; cache the winner."""
    n, k = _shape_nk(qdata, fmt)
    if (fmt, n, k) not in _TUNED_DEQUANT:
        tune_dequant(qdata, scale, tensor_scale, fmt)
    cfg = _pick_config(x, qdata, scale, tensor_scale, bias, fmt)
    times = {
        "fused": _bench(lambda: launch_fused(x, qdata, scale, tensor_scale, bias, fmt, cfg)),
        "dequant_mm": _bench(lambda: _dequant_mm(x, qdata, scale, tensor_scale, bias, fmt)),
    }
    path = min(times, key=lambda p: times[p])
    _TUNED_PATH[_fused_key(x, n, bias, fmt)] = path
    _log.info(
        "qconvert hopper %s M=%d N=%d K=%d: %s (fused %s %.3f ms, dequant+mm %.3f ms)",
        fmt, x.shape[0], n, k, path, cfg.name, times["fused"], times["dequant_mm"],
    )  # fmt: skip
    return path, times


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile(fullgraph=True) and CUDA graphs see opaque calls)
# ---------------------------------------------------------------------------------------------


def _shape_nk(qdata: torch.Tensor, fmt: str) -> tuple[int, int]:
    if fmt == NVFP4:
        return qdata.shape[0], qdata.shape[1] * 2
    if fmt == MXFP8:
        return qdata.shape[0], qdata.shape[1]
    raise ValueError(f"unknown format {fmt!r}")


def _on_gpu(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.device.type == "cuda"


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _dequant_gpu(
    qdata: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor | None, fmt: str
) -> torch.Tensor:
    """Packed weight -> bf16 ``[N, K]`` (torchao's bf16 dequantize, bit for bit)."""
    if not qdata.is_cuda:  # CPU, and CPU fake tensors under torch.compile
        return _dequant_torch(qdata, scale, tensor_scale, fmt)
    n, k = _shape_nk(qdata, fmt)
    if (fmt, n, k) not in _TUNED_DEQUANT and _can_tune() and not _is_fake(qdata):
        tune_dequant(qdata, scale, tensor_scale, fmt)
    return launch_dequant(qdata, scale, tensor_scale, fmt, wrap=True)


hopper_dequant = traceable_op("qconvert::hopper_dequant", _dequant_gpu)


@torch.library.custom_op("qconvert::hopper_fused_linear", mutates_args=())
def hopper_fused_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    """``x[M, K] @ dequant(W)^T + bias``, the weight decoded inside the GEMM's K loop."""
    if _on_gpu(x):
        x = x if x.stride(-1) == 1 else x.contiguous()
        cfg = _pick_config(x, qdata, scale, tensor_scale, bias, fmt)
        return launch_fused(x, qdata, scale, tensor_scale, bias, fmt, cfg)
    return F.linear(x, _dequant_torch(qdata, scale, tensor_scale, fmt), bias)


@hopper_fused_linear.register_fake
def _(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    n, _ = _shape_nk(qdata, fmt)
    return x.new_empty((x.shape[0], n), dtype=torch.bfloat16)


@torch.library.custom_op("qconvert::hopper_linear", mutates_args=())
def hopper_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    """``x[M, K] @ dequant(W)^T + bias`` by whichever path measured faster for this shape.

    The first call per (format, M bucket, N, K) times both paths; inside a CUDA-graph capture,
    or with QCONVERT_HOPPER_AUTOTUNE=0, an untimed rule applies (fused up to
    DEFAULT_FUSED_MAX_M rows).
    """
    if not _on_gpu(x):
        return F.linear(x, _dequant_torch(qdata, scale, tensor_scale, fmt), bias)
    x = x if x.stride(-1) == 1 else x.contiguous()
    n = qdata.shape[0]
    path = _TUNED_PATH.get(_fused_key(x, n, bias, fmt))
    if path is None:
        if _can_tune():
            path = choose_path(x, qdata, scale, tensor_scale, bias, fmt)[0]
        else:
            path = "fused" if x.shape[0] <= DEFAULT_FUSED_MAX_M else "dequant_mm"
    if path == "fused":
        cfg = _pick_config(x, qdata, scale, tensor_scale, bias, fmt)
        return launch_fused(x, qdata, scale, tensor_scale, bias, fmt, cfg)
    return _dequant_mm(x, qdata, scale, tensor_scale, bias, fmt)


@hopper_linear.register_fake
def _(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    n, _ = _shape_nk(qdata, fmt)
    return x.new_empty((x.shape[0], n), dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------

IMPLS = ("auto", "fused", "dequant_mm")


class HopperQuantLinear(RuntimeLinear):
    """A Linear whose weight stays NVFP4 / MXFP8 in memory, run by the Triton kernels above.

    ``impl``: ``"auto"`` (``qconvert::hopper_linear``: the faster path per shape, measured on
    first use), ``"fused"`` (``qconvert::hopper_fused_linear``) or ``"dequant_mm"``
    (``qconvert::hopper_dequant`` + ``F.linear``). Activations must be bf16; the output is bf16.

    An ``nn.Linear`` to PEFT and diffusers (see ``qconvert.loaders.compat``): ``weight`` is the
    checkpoint's torchao tensor (``layout``: how it was saved), rebuilt from the packed buffers
    on access; assigning a dense weight requantizes it (LoRA merge).
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    tensor_scale: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        packed: PackedWeight,
        bias: torch.Tensor | None = None,
        impl: str = "auto",
        layout: SavedLayout | None = None,
    ) -> None:
        super().__init__(packed.in_features, packed.out_features)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.fmt = packed.fmt
        self.impl = impl
        self.layout = layout or default_layout(packed.fmt, packed.out_features, packed.in_features)
        self._runtime_layout = self.layout.unswizzled(BLOCK_SIZES[packed.fmt])
        self._set_packed(packed)
        if bias is not None:
            if tuple(bias.shape) != (packed.out_features,):
                raise ValueError(f"bias shape {list(bias.shape)} != [{packed.out_features}]")
            bias = bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)

    def _set_packed(self, packed: PackedWeight) -> None:
        self.register_buffer("qdata", packed.qdata, persistent=False)
        self.register_buffer("scale", packed.scale, persistent=False)
        self.register_buffer("tensor_scale", packed.tensor_scale, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, impl: str = "auto") -> "HopperQuantLinear":
        """Build from an ``nn.Linear`` whose weight is an ``NVFP4Tensor`` or ``MXTensor``."""
        weight = linear.weight
        inner = weight.data if isinstance(weight, nn.Parameter) else weight
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(pack_weight(inner), bias, impl=impl, layout=SavedLayout.of(inner))

    def torchao_weight(self, saved: bool = True) -> torch.Tensor:
        """The ``NVFP4Tensor`` / ``MXTensor``: ``saved``, as the file holds it (block scales
        swizzled again into a new tensor if they were); else with this module's row-major
        scales (no copy). qdata is shared with the kernels either way."""
        layout = self.layout if saved else self._runtime_layout
        scale = self.scale.view(torch.uint8)
        if layout.attrs.get("is_swizzled_scales"):
            scale = to_blocked(scale)
        inner = {"qdata": self.qdata, "scale": scale}
        if "per_tensor_scale" in layout.pieces:
            inner["per_tensor_scale"] = self.tensor_scale
        return layout.build(inner)

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Quantize a dense ``[N, K]`` weight in this layer's format (what torchao builds on
        Blackwell) and repack it for the kernels."""
        from qconvert.formats import FORMATS

        dense = weight.detach().to(device=self.qdata.device, dtype=torch.bfloat16).contiguous()
        quantized = FORMATS[self.fmt].quantize(dense)
        self._set_packed(pack_weight(quantized))

    def set_quantized_weight(self, weight: torch.Tensor) -> None:
        """Repack a torchao ``NVFP4Tensor`` / ``MXTensor`` of this layer's shape (no rounding)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {list(weight.shape)} != {[self.out_features, self.in_features]}"
            )
        packed = pack_weight(weight)
        if packed.fmt != self.fmt:
            raise ValueError(f"a {packed.fmt} weight for a {self.fmt} layer")
        self.layout = SavedLayout.of(weight)
        self._runtime_layout = self.layout.unswizzled(BLOCK_SIZES[self.fmt])
        self._set_packed(packed)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fmt={self.fmt}, bias={self.bias is not None}, impl={self.impl}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise TypeError(f"HopperQuantLinear takes bf16 activations, got {x.dtype}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        args = (x2, self.qdata, self.scale, self.tensor_scale, self.bias, self.fmt)
        impl = self.impl
        if impl == "auto" and torch.compiler.is_compiling():
            # Compiled: decide from the (static) row count, so that the dequantize kernel and
            # the matmul are visible to inductor and launched without a Python op per call.
            impl = "fused" if x2.shape[0] <= DEFAULT_FUSED_MAX_M else "dequant_mm"
        if impl == "fused":
            y = torch.ops.qconvert.hopper_fused_linear.default(*args)
        elif impl == "dequant_mm":
            w = torch.ops.qconvert.hopper_dequant.default(
                self.qdata, self.scale, self.tensor_scale, self.fmt
            )
            y = F.linear(x2, w, self.bias)
        else:
            y = torch.ops.qconvert.hopper_linear.default(*args)
        return y.reshape(*lead, self.out_features)


def weight_bytes(fmt: str, n: int, k: int) -> int:
    """Bytes the kernels read for one weight (qdata + row-major scales)."""
    if fmt == NVFP4:
        return n * k // 2 + n * k // 16 + 4
    return n * k + n * (k // 32)
