"""Rowwise FP8 runtime for qconvert's ``fp8`` checkpoints on sm89 / sm90 (Ada, Hopper).

The checkpoint holds torchao's ``Float8Tensor`` (e4m3 ``qdata [N, K]``, fp32 ``scale [N, 1]``,
the weight of ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``). At run time
each Linear computes what torchao's own rowwise path computes, in two launches instead of ~8:

1. ``quantize_rows``: one Triton kernel per call quantizes the bf16 activations per token
   (row amax, scale, divide, clamp, round to e4m3) — the same numbers as torchao's
   ``_choose_scale_float8`` + ``_quantize_affine_float8`` on CUDA, bit for bit (tested), except
   that an all-zero row gets scale 1 instead of torchao's 0 (which turns the row's output into
   NaN). A NaN activation turns its output row into NaN either way.
2. a rowwise-scaled FP8 tensor-core GEMM with the bias in its epilogue: mslk's
   ``f8f8bf16_rowwise`` when ``import mslk`` works (never a dependency: a broken mslk costs one
   warning line), else ``torch._scaled_mm``. ``QCONVERT_FP8_GEMM=torch|mslk`` forces one.

Both run inside the custom op ``qconvert::fp8_rowwise_linear`` (opaque to
``torch.compile(fullgraph=True)``, capturable in CUDA graphs). Without CUDA + Triton the op
runs a pure-torch emulation with the same activation numerics (CPU tests).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from qconvert.loaders.hopper import HAS_TRITON, tl, triton

_log = logging.getLogger(__name__)

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
# torch's CUDA ``bf16_tensor / 448.0`` multiplies by the fp32 reciprocal (a CPU scalar divisor).
INV_E4M3_MAX = float(torch.tensor(1.0, dtype=torch.float32) / E4M3_MAX)
SINGLE_PASS_MAX_K = 16384  # rows up to this length are held in registers (one read)


# ---------------------------------------------------------------------------------------------
# The GEMM backend: mslk when it imports, else torch._scaled_mm
# ---------------------------------------------------------------------------------------------


@functools.cache
def mslk_gemm() -> bool:
    """Whether mslk's ``f8f8bf16_rowwise`` is usable. A missing mslk is silent; an installed
    one that fails to import (e.g. built for another torch) warns once and is left out."""
    forced = os.environ.get("QCONVERT_FP8_GEMM", "auto")
    if forced not in ("auto", "torch", "mslk"):
        raise ValueError(f"QCONVERT_FP8_GEMM must be auto, torch or mslk, got {forced!r}")
    if forced == "torch":
        return False
    try:
        import mslk  # noqa: F401

        op = torch.ops.mslk.f8f8bf16_rowwise  # registered by the import
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] != "mslk":
            _warn_mslk(exc)
        elif forced == "mslk":
            raise RuntimeError("QCONVERT_FP8_GEMM=mslk but mslk is not installed") from exc
        return False
    except Exception as exc:  # a torch/mslk mismatch: undefined symbols, version asserts
        _warn_mslk(exc)
        if forced == "mslk":
            raise RuntimeError("QCONVERT_FP8_GEMM=mslk but `import mslk` failed") from exc
        return False
    return op is not None


def _warn_mslk(exc: BaseException) -> None:
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    _log.warning(
        "qconvert: mslk is installed but `import mslk` failed (%s: %s), likely built for another "
        "torch; fp8 GEMMs use torch._scaled_mm instead",
        type(exc).__name__,
        first,
    )


def gemm_backend() -> str:
    return "mslk f8f8bf16_rowwise" if mslk_gemm() else "torch._scaled_mm"


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


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``x [M, K]`` -> (e4m3 ``[M, K]``, fp32 scale ``[M, 1]``), one scale per row."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows takes [M, K], got {list(x.shape)}")
    if not (HAS_TRITON and x.is_cuda):
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
    _quantize_rows_kernel[(m,)](
        x, q, s, k, x.stride(0), q.stride(0),
        BLOCK_K=block, SINGLE=single, INV_MAX=INV_E4M3_MAX, FP8_MAX=E4M3_MAX, num_warps=warps,
    )  # fmt: skip
    return q, s


# ---------------------------------------------------------------------------------------------
# The op and the module
# ---------------------------------------------------------------------------------------------


def _gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale_row: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(xq * x_scale) @ (wq * w_scale)^T + bias`` in bf16 on the FP8 tensor cores."""
    if mslk_gemm():
        return torch.ops.mslk.f8f8bf16_rowwise(
            xq, wq, x_scale, w_scale_row.reshape(-1, 1), bias=bias, use_fast_accum=True
        )
    return torch._scaled_mm(
        xq,
        wq.t(),
        scale_a=x_scale,
        scale_b=w_scale_row,
        bias=bias,
        out_dtype=torch.bfloat16,
        use_fast_accum=True,
    )


@torch.library.custom_op("qconvert::fp8_rowwise_linear", mutates_args=())
def fp8_rowwise_linear(
    x: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """bf16 ``x [M, K]`` -> bf16 ``[M, N]``: per-token FP8 activations times the rowwise FP8
    weight (``qdata [N, K]`` e4m3, ``w_scale [1, N]`` fp32), plus ``bias``."""
    xq, xs = quantize_rows(x)
    if HAS_TRITON and x.is_cuda:
        return _gemm(xq, xs, qdata, w_scale, bias)
    out = (xq.float() * xs) @ (qdata.float() * w_scale.reshape(-1, 1)).T
    if bias is not None:
        out = out + bias.float()
    return out.to(torch.bfloat16)


@fp8_rowwise_linear.register_fake
def _(
    x: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty((x.shape[0], qdata.shape[0]), dtype=torch.bfloat16)


class Fp8RowwiseLinear(nn.Module):
    """A Linear with an e4m3 rowwise weight, run as per-token FP8 activations x FP8 weight."""

    qdata: torch.Tensor
    w_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if qdata.dim() != 2 or qdata.dtype != torch.float8_e4m3fn:
            raise ValueError(f"qdata must be e4m3 [N, K], got {qdata.dtype} {list(qdata.shape)}")
        n, k = qdata.shape
        if scale.numel() != n:
            raise ValueError(f"rowwise FP8 needs {n} scales (one per row), got {scale.numel()}")
        self.in_features, self.out_features = int(k), int(n)
        self.register_buffer("qdata", qdata.contiguous())
        self.register_buffer("w_scale", scale.detach().float().reshape(1, n).contiguous())
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise ValueError(f"bias shape {list(bias.shape)} != [{n}]")
            bias = bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8RowwiseLinear:
        """Build from an ``nn.Linear`` whose weight is a rowwise e4m3 torchao ``Float8Tensor``."""
        weight = linear.weight
        inner = weight.data if isinstance(weight, nn.Parameter) else weight
        if not is_rowwise_e4m3(inner):
            raise ValueError(
                f"expected a rowwise e4m3 Float8Tensor weight, got {type(inner).__name__} "
                f"(block_size {getattr(inner, 'block_size', None)})"
            )
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(inner.qdata, inner.scale, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise TypeError(f"Fp8RowwiseLinear takes bf16 activations, got {x.dtype}")
        lead = x.shape[:-1]
        y = torch.ops.qconvert.fp8_rowwise_linear.default(
            x.reshape(-1, self.in_features), self.qdata, self.w_scale, self.bias
        )
        return y.reshape(*lead, self.out_features)


def is_rowwise_e4m3(weight: torch.Tensor) -> bool:
    """A 2-D torchao ``Float8Tensor`` with e4m3 data and one scale per output row."""
    if type(weight).__name__ != "Float8Tensor" or weight.dim() != 2:
        return False
    n, k = weight.shape
    return (
        weight.qdata.dtype == torch.float8_e4m3fn
        and list(weight.block_size) == [1, int(k)]
        and weight.scale.numel() == int(n)
    )
