"""Rowwise FP8 runtime for qconvert's ``fp8`` checkpoints on sm89 / sm90 (Ada, Hopper).

The checkpoint holds torchao's ``Float8Tensor`` (e4m3 ``qdata [N, K]``, fp32 ``scale [N, 1]``,
the weight of ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``). At run time
each Linear computes what torchao's own rowwise path computes, in two launches instead of ~8:

1. ``quantize_rows``: one Triton kernel per call quantizes the bf16 activations per token
   (row amax, scale, divide, clamp, round to e4m3) — the same numbers as torchao's
   ``_choose_scale_float8`` + ``_quantize_affine_float8`` on CUDA, bit for bit (tested), except
   that an all-zero row gets scale 1 instead of torchao's 0 (which turns the row's output into
   NaN). A NaN activation turns its output row into NaN either way.
2. a rowwise-scaled FP8 tensor-core GEMM with the bias in its epilogue: ``torch._scaled_mm``
   (cuBLAS), the call torchao makes. For shapes cuBLAS refuses, the first of ``STRATEGIES``
   that runs (bias added after, mslk's ``f8f8bf16_rowwise`` when ``import mslk`` works, rows
   padded to 16, dequantize), remembered per shape and logged once. mslk is never a
   dependency: a broken mslk costs one warning line. ``QCONVERT_FP8_GEMM=mslk`` runs every GEMM
   through mslk, ``=torch`` never touches it. On the H100 mslk was no faster under CUDA graphs
   (111.7 vs 112.3 ms per FLUX step) and much slower without them (host-bound), so it is not
   the default (benchmarks/results/flux_step_probe_h100.json).

Eager and CUDA graphs: the custom op ``qconvert::fp8_rowwise_linear`` runs both. Under
``torch.compile(fullgraph=True)`` the quantize kernel is a ``triton_op`` and ``_scaled_mm`` an
aten call, so inductor launches both without a Python op per call (M < ``DIRECT_MIN_M``
still goes through the op). Without CUDA + Triton the op runs a pure-torch emulation with the
same activation numerics (CPU tests).
"""

from __future__ import annotations

import functools
import gc
import logging
import os

import torch
from torch import nn

from qconvert.loaders.triton_support import HAS_TRITON, tl, traceable_op, triton

_log = logging.getLogger(__name__)

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
# torch's CUDA ``bf16_tensor / 448.0`` multiplies by the fp32 reciprocal (a CPU scalar divisor).
INV_E4M3_MAX = float(torch.tensor(1.0, dtype=torch.float32) / E4M3_MAX)
SINGLE_PASS_MAX_K = 16384  # rows up to this length are held in registers (one read)


# ---------------------------------------------------------------------------------------------
# The GEMM backend: mslk when it imports, else torch._scaled_mm
# ---------------------------------------------------------------------------------------------


def _choice() -> str:
    forced = os.environ.get("QCONVERT_FP8_GEMM", "auto")
    if forced not in ("auto", "torch", "mslk"):
        raise ValueError(f"QCONVERT_FP8_GEMM must be auto, torch or mslk, got {forced!r}")
    return forced


@functools.cache
def mslk_available() -> bool:
    """Whether mslk's ``f8f8bf16_rowwise`` is usable. A missing mslk is silent; an installed
    one that fails to import (e.g. built for another torch) warns once and is left out."""
    forced = _choice()
    if forced == "torch":
        return False
    try:
        import mslk  # noqa: F401

        torch.ops.mslk.f8f8bf16_rowwise  # noqa: B018 - registered by the import
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
    return True


def _warn_mslk(exc: BaseException) -> None:
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    _log.warning(
        "qconvert: mslk is installed but `import mslk` failed (%s: %s), likely built for another "
        "torch; fp8 GEMMs use torch._scaled_mm only",
        type(exc).__name__,
        first,
    )


def mslk_forced() -> bool:
    return _choice() == "mslk" and mslk_available()


def gemm_backend() -> str:
    """What runs the FP8 GEMMs, for the loader's log line."""
    if mslk_forced():
        return "mslk f8f8bf16_rowwise (QCONVERT_FP8_GEMM=mslk)"
    if mslk_available():
        return "torch._scaled_mm; mslk f8f8bf16_rowwise for shapes cuBLAS refuses"
    return "torch._scaled_mm"


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


# ---------------------------------------------------------------------------------------------
# The op and the module
# ---------------------------------------------------------------------------------------------


# Compiled code calls torch._scaled_mm directly from DIRECT_MIN_M rows, with the bias in its
# epilogue from BIAS_EPILOGUE_MIN_M rows and added after it below that: on the H100 (torch
# 2.11, cuBLAS 13) cuBLAS refuses rowwise scaling + bias for small M with large K (M = 1..33,
# N = 3072, K >= 12288; M <= 512, N = 64, K = 20000), and took every tested shape without it
# (tests/test_fp8_runtime.py::test_direct_scaled_mm_shapes). In eager
# mode and below DIRECT_MIN_M the op below runs, falling back per shape.
DIRECT_MIN_M = 16
BIAS_EPILOGUE_MIN_M = 256
BIAS_EPILOGUE_MIN_N = 3072  # N = 64, K = 20000 was refused with a bias up to M = 512


def bias_in_epilogue(m: int, n: int) -> bool:
    """Whether compiled code fuses the bias into torch._scaled_mm (else adds it after)."""
    return m >= BIAS_EPILOGUE_MIN_M and n >= BIAS_EPILOGUE_MIN_N
STRATEGIES = ("scaled_mm", "scaled_mm, bias after", "mslk", "scaled_mm, rows padded to 16",
              "dequantize")  # fmt: skip
_PLAN: dict[tuple[int, int, int, bool, int | None], str] = {}


def _scaled_mm(xq, xs, wq, ws_row, bias) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch._scaled_mm(
        xq, wq.t(), scale_a=xs, scale_b=ws_row, bias=bias, out_dtype=torch.bfloat16,
        use_fast_accum=True,
    )  # fmt: skip


def _add(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def _run(name: str, xq, xs, wq, ws_row, bias) -> torch.Tensor:  # type: ignore[no-untyped-def]
    if name == "scaled_mm":
        return _scaled_mm(xq, xs, wq, ws_row, bias)
    if name == "scaled_mm, bias after":
        return _add(_scaled_mm(xq, xs, wq, ws_row, None), bias)
    if name == "mslk":
        return torch.ops.mslk.f8f8bf16_rowwise(
            xq, wq, xs, ws_row.reshape(-1, 1), bias=bias, use_fast_accum=True
        )
    if name == "scaled_mm, rows padded to 16":
        m = xq.shape[0]
        pad = -m % 16 or 16
        xq_p = torch.cat([xq, xq.new_zeros((pad, xq.shape[1]))])
        xs_p = torch.cat([xs, xs.new_ones((pad, 1))])
        return _add(_scaled_mm(xq_p, xs_p, wq, ws_row, None)[:m], bias)
    out = (xq.float() * xs) @ (wq.float() * ws_row.reshape(-1, 1)).T
    return _add(out, None if bias is None else bias.float()).to(torch.bfloat16)


def _gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws_row: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(xq * xs) @ (wq * ws)^T + bias`` in bf16 on the FP8 tensor cores: torch._scaled_mm,
    else the first strategy that runs for this shape (remembered per shape)."""
    if mslk_forced():
        return _run("mslk", xq, xs, wq, ws_row, bias)
    key = (xq.shape[0], wq.shape[0], wq.shape[1], bias is not None, xq.device.index)
    plan = _PLAN.get(key)
    if plan is not None:
        return _run(plan, xq, xs, wq, ws_row, bias)
    errors = []
    for name in STRATEGIES:
        if name == "mslk" and not mslk_available():
            continue
        try:
            out = _run(name, xq, xs, wq, ws_row, bias)
        except RuntimeError as exc:
            errors.append(f"{name}: {str(exc).splitlines()[0][:120]}")
            continue
        _PLAN[key] = name
        if errors:
            _log.warning(
                "qconvert fp8: M=%d N=%d K=%d%s: %s; runs %s",
                key[0], key[1], key[2], " with bias" if key[3] else "", errors[0], name,
            )  # fmt: skip
        return out
    raise RuntimeError("no FP8 GEMM ran: " + "; ".join(errors))


@torch.library.custom_op("qconvert::fp8_rowwise_linear", mutates_args=())
def fp8_rowwise_linear(
    x: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """bf16 ``x [M, K]`` -> bf16 ``[M, N]``: per-token FP8 activations times the rowwise FP8
    weight (``qdata [N, K]`` e4m3, ``w_scale [1, N]`` fp32), plus ``bias``."""
    xq, xs = quantize_rows(x)
    if HAS_TRITON and x.is_cuda:
        return _gemm(xq, xs, qdata, w_scale, bias)
    return _run("dequantize", xq, xs, qdata, w_scale, bias)


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
        # torch._scaled_mm straight from compiled code, unless mslk is forced for every GEMM.
        self.direct = os.environ.get("QCONVERT_FP8_GEMM", "auto") != "mslk"
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
        x2 = x.reshape(-1, self.in_features)
        if (
            torch.compiler.is_compiling()
            and self.direct
            and x2.is_cuda
            and x2.shape[0] >= DIRECT_MIN_M
        ):
            # Compiled: the quantize kernel and the GEMM are visible to inductor (no Python
            # op per call on the host).
            xq, xs = torch.ops.qconvert.quantize_rows.default(x2)
            if bias_in_epilogue(x2.shape[0], self.out_features):
                y = _scaled_mm(xq, xs, self.qdata, self.w_scale, self.bias)
            else:
                y = _add(_scaled_mm(xq, xs, self.qdata, self.w_scale, None), self.bias)
        else:
            y = torch.ops.qconvert.fp8_rowwise_linear.default(
                x2, self.qdata, self.w_scale, self.bias
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


# Attention modules whose diffusers processor has a fused-projection path: {class: [(the
# Linears, the fused Linear's name)]}. Rowwise FP8 rows are independent, so concatenating the
# weights is exact; one GEMM then quantizes the shared input once instead of three times.
FUSABLE = {
    "FluxAttention": [(("to_q", "to_k", "to_v"), "to_qkv"),
                      (("add_q_proj", "add_k_proj", "add_v_proj"), "to_added_qkv")],
}  # fmt: skip


def concat(linears: list[Fp8RowwiseLinear]) -> Fp8RowwiseLinear:
    """One Fp8RowwiseLinear computing the given ones side by side (outputs concatenated)."""
    biases = [m.bias for m in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([
            b if b is not None else m.qdata.new_zeros(m.out_features, dtype=torch.bfloat16)
            for m, b in zip(linears, biases, strict=True)
        ])  # fmt: skip
    return Fp8RowwiseLinear(
        torch.cat([m.qdata for m in linears]),
        torch.cat([m.w_scale.reshape(-1) for m in linears]),
        bias,
    )


def fuse_projections(model: nn.Module) -> int:
    """Fuse the q/k/v Fp8RowwiseLinears of known attention modules (``FUSABLE``) into one, as
    diffusers' ``fuse_qkv_projections`` does for plain Linears. Returns how many modules."""
    fused = 0
    for module in model.modules():
        groups = FUSABLE.get(type(module).__name__)
        if not groups or getattr(module, "fused_projections", True):
            continue
        present = [(names, out) for names, out in groups if hasattr(module, names[0])]
        parts = [[getattr(module, n, None) for n in names] for names, _ in present]
        if not parts or not all(isinstance(m, Fp8RowwiseLinear) for p in parts for m in p):
            continue  # all or nothing: the fused processor path reads every fused Linear
        if any(len({m.in_features for m in p}) != 1 for p in parts):
            continue
        for (names, out), p in zip(present, parts, strict=True):
            setattr(module, out, concat(p))
            for n in names:
                delattr(module, n)
        module.fused_projections = True
        fused += 1
        if fused % 8 == 0:
            gc.collect()  # free the unfused copies as we go: bounds the peak while loading
    return fused
