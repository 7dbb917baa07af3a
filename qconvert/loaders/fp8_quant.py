"""Per-token FP8 activation quantization for qconvert's rowwise FP8 path: one Triton kernel per
call on CUDA (a ``triton_op`` torch.compile traces into), plain torch elsewhere; the numbers of
torchao's ``_choose_scale_float8`` + ``_quantize_affine_float8``, bit for bit (see fp8.py)."""

from __future__ import annotations

import torch

from qconvert.loaders.triton_support import HAS_TRITON, tl, traceable_op, triton

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
# torch's CUDA ``bf16_tensor / 448.0`` multiplies by the fp32 reciprocal (a CPU scalar divisor).
INV_E4M3_MAX = float(torch.tensor(1.0, dtype=torch.float32) / E4M3_MAX)
SINGLE_PASS_MAX_K = 16384  # rows up to this length are held in registers (one read)


# ---------------------------------------------------------------------------------------------
# Per-token activation quantization
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
        BLOCK_K: tl.constexpr, SINGLE: tl.constexpr,
        INV_MAX: tl.constexpr, FP8_MAX: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * stride_q
        offs = tl.arange(0, BLOCK_K)
        if SINGLE:
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(v), axis=0)
        else:
            acc = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                o = k0 + offs
                w = tl.load(x_row + o, mask=o < K, other=0.0).to(tl.float32)
                acc = tl.maximum(acc, tl.abs(w))
            amax = tl.max(acc, axis=0)
        # torchao: scale = bf16(amax) / 448 in bf16 (CUDA: times the fp32 reciprocal), to fp32.
        s = (amax * INV_MAX).to(tl.bfloat16).to(tl.float32)
        s = tl.where(s == 0.0, 1.0, s)  # torchao's 0 would make the row NaN
        tl.store(s_ptr + row, s)
        if SINGLE:
            y = tl.math.div_rn(v, s)
            y = tl.minimum(tl.maximum(y, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL), FP8_MAX,
                           propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
            tl.store(q_row + offs, y.to(tl.float8e4nv), mask=offs < K)
        else:
            for k0 in range(0, K, BLOCK_K):
                o = k0 + offs
                w = tl.load(x_row + o, mask=o < K, other=0.0).to(tl.float32)
                y = tl.math.div_rn(w, s)
                y = tl.minimum(tl.maximum(y, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL),
                               FP8_MAX, propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
                tl.store(q_row + o, y.to(tl.float8e4nv), mask=o < K)


def _quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (amax * INV_E4M3_MAX).to(torch.bfloat16).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _quantize_rows_gpu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not x.is_cuda:  # CPU, and CPU fake tensors under torch.compile
        return _quantize_rows_torch(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    single = k <= SINGLE_PASS_MAX_K
    block = triton.next_power_of_2(k) if single else 4096
    warps = max(1, min(16, block // 512))
    torch.library.wrap_triton(_quantize_rows_kernel)[(m,)](
        x, q, s, k, x.stride(0), q.stride(0),
        BLOCK_K=block, SINGLE=single, INV_MAX=INV_E4M3_MAX, FP8_MAX=E4M3_MAX, num_warps=warps,
    )  # fmt: skip
    return q, s


traceable_op("qconvert::quantize_rows", _quantize_rows_gpu)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``x [M, K]`` -> (e4m3 ``[M, K]``, fp32 scale ``[M, 1]``), one scale per row."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows takes [M, K], got {list(x.shape)}")
    if not (HAS_TRITON and x.is_cuda):
        return _quantize_rows_torch(x)
    return torch.ops.qconvert.quantize_rows.default(x)
