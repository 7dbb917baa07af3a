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

import gc
import logging
import os

import torch
from torch import nn

from qconvert.loaders.compat import RuntimeLinear, SavedLayout, default_layout
from qconvert.loaders.fp8_backend import gemm_backend, mslk_available, mslk_forced
from qconvert.loaders.fp8_quant import E4M3_MAX, INV_E4M3_MAX, quantize_rows
from qconvert.loaders.triton_support import HAS_TRITON

_log = logging.getLogger(__name__)
__all__ = [
    "E4M3_MAX",
    "INV_E4M3_MAX",
    "Fp8RowwiseLinear",
    "Fp8RowwiseSlice",
    "fuse_projections",
    "gemm_backend",
    "is_rowwise_e4m3",
    "mslk_available",
    "quantize_rows",
]  # fmt: skip


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


class Fp8RowwiseLinear(RuntimeLinear):
    """A Linear with an e4m3 rowwise weight, run as per-token FP8 activations x FP8 weight.

    An ``nn.Linear`` to PEFT and diffusers (see ``qconvert.loaders.compat``): ``weight`` is the
    checkpoint's ``Float8Tensor`` (``layout``: how it was saved), sharing the buffers' data;
    assigning a dense weight requantizes it (LoRA merge). ``fused_parts``: set on a q/k/v-fused
    Linear, whose rows are its parts' weights (they, not it, appear in ``state_dict``).
    """

    fmt = "fp8"
    qdata: torch.Tensor
    w_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        layout: SavedLayout | None = None,
    ) -> None:
        if qdata.dim() != 2 or qdata.dtype != torch.float8_e4m3fn:
            raise ValueError(f"qdata must be e4m3 [N, K], got {qdata.dtype} {list(qdata.shape)}")
        n, k = qdata.shape
        if scale.numel() != n:
            raise ValueError(f"rowwise FP8 needs {n} scales (one per row), got {scale.numel()}")
        super().__init__(int(k), int(n))
        self._init_runtime(layout or default_layout("fp8", int(n), int(k)))
        self._set_rows(qdata, scale)
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise ValueError(f"bias shape {list(bias.shape)} != [{n}]")
            bias = bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)

    def _init_runtime(self, layout: SavedLayout) -> None:
        # torch._scaled_mm straight from compiled code, unless mslk is forced for every GEMM.
        self.direct = os.environ.get("QCONVERT_FP8_GEMM", "auto") != "mslk"
        self.layout = layout
        self.fused_parts: tuple[str, ...] = ()

    def _set_rows(self, qdata: torch.Tensor, scale: torch.Tensor) -> None:
        n = qdata.shape[0]
        self.register_buffer("qdata", qdata.contiguous(), persistent=False)
        w_scale = scale.detach().float().reshape(1, n).contiguous()
        self.register_buffer("w_scale", w_scale, persistent=False)

    def torchao_weight(self, saved: bool = True) -> torch.Tensor:
        """The ``Float8Tensor`` as saved, sharing this module's data (one layout here)."""
        return self.layout.build({"qdata": self.qdata, "scale": self.w_scale})

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Quantize a dense ``[N, K]`` weight rowwise (torchao's Float8Tensor) into the buffers."""
        quantized = _quantize_dense(weight, self.qdata.device)
        self._set_rows(quantized.qdata, quantized.scale)

    def set_quantized_weight(self, weight: torch.Tensor) -> None:
        """Take a rowwise e4m3 ``Float8Tensor`` of this layer's shape as is."""
        if not is_rowwise_e4m3(weight) or tuple(weight.shape) != tuple(self.qdata.shape):
            raise ValueError(
                f"expected a rowwise e4m3 Float8Tensor of shape {list(self.qdata.shape)}"
            )
        self.layout = SavedLayout.of(weight)
        self._set_rows(weight.qdata, weight.scale)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if not self.fused_parts:  # a fused Linear's rows are saved as its parts
            super()._save_to_state_dict(destination, prefix, keep_vars)

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
        return cls(inner.qdata, inner.scale, bias, layout=SavedLayout.of(inner))

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


def _quantize_dense(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    from qconvert.formats import FORMATS

    dense = weight.detach().to(device=device, dtype=torch.bfloat16).contiguous()
    return FORMATS["fp8"].quantize(dense)


class Fp8RowwiseSlice(Fp8RowwiseLinear):
    """Rows ``[start, stop)`` of a fused Fp8RowwiseLinear, under the name of the projection they
    were (``to_q``...): what PEFT, diffusers and ``state_dict`` see of a fused attention. Holds
    no tensors (moving the model moves the fused one); its forward runs its rows alone, which
    the attention does when a LoRA wraps one of its projections (see ``fuse_projections``)."""

    def __init__(self, owner: Fp8RowwiseLinear, start: int, stop: int) -> None:
        RuntimeLinear.__init__(self, owner.in_features, stop - start)
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner is the attention's
        self.start, self.stop = int(start), int(stop)
        self._init_runtime(default_layout("fp8", stop - start, owner.in_features))
        # Compiled code runs a slice through the opaque op, not torch._scaled_mm inline: inductor
        # 2.11 fails to lower _scaled_mm on a view of the fused weight (AssertionError at FLUX's
        # real shape, add_q_proj M=512 with a LoRA on to_q/k/v; H200, benchmarks/results/
        # repro_fp8_lora_h200.txt). Slices run only while a LoRA has unfused the attention.
        self.direct = False

    @property  # type: ignore[override]
    def qdata(self) -> torch.Tensor:
        return self._owner.qdata[self.start : self.stop]

    @property  # type: ignore[override]
    def w_scale(self) -> torch.Tensor:
        return self._owner.w_scale[:, self.start : self.stop]

    @property  # type: ignore[override]
    def bias(self) -> torch.Tensor | None:
        b = self._owner.bias
        return None if b is None else b[self.start : self.stop]

    def torchao_weight(self, saved: bool = True) -> torch.Tensor:
        """This projection's ``Float8Tensor``: views of its rows of the fused weight (disjoint
        from the other projections', which safetensors saves as separate tensors)."""
        return self.layout.build({"qdata": self.qdata, "scale": self.w_scale})

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        self.set_quantized_weight(_quantize_dense(weight, self._owner.qdata.device))

    def set_quantized_weight(self, weight: torch.Tensor) -> None:
        """Write a rowwise ``Float8Tensor`` into this projection's rows of the fused weight."""
        self._owner.qdata[self.start : self.stop].copy_(weight.qdata)
        self._owner.w_scale[:, self.start : self.stop].copy_(weight.scale.reshape(1, -1))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        RuntimeLinear._save_to_state_dict(self, destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows={self.start}:{self.stop} of the fused projection"


# Attention modules whose diffusers processor has a fused-projection path: {class: [(the
# Linears, the fused Linear's name)]}. Rowwise FP8 rows are independent, so concatenating the
# weights is exact; one GEMM then quantizes the shared input once instead of three times.
FUSABLE = {
    "FluxAttention": [(("to_q", "to_k", "to_v"), "to_qkv"),
                      (("add_q_proj", "add_k_proj", "add_v_proj"), "to_added_qkv")],
}  # fmt: skip
_FUSED_NAMES = "_qconvert_fused_names"
_FUSED_ATTENTIONS = "_qconvert_fused_attentions"


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


def _sync_fusion(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a model with fused attentions: each runs its fused GEMM only while
    every projection is qconvert's own slice; a LoRA-wrapped projection (PEFT) makes it call
    each projection (and its LoRA) separately, until the LoRA is unloaded. A hook on the model,
    not on the attentions: compile_repeated_blocks compiles the blocks, so the flag changes
    outside compiled code and a hotswapped LoRA does not recompile."""
    for module in getattr(model, _FUSED_ATTENTIONS):
        names = getattr(module, _FUSED_NAMES)
        fused = all(type(getattr(module, n, None)) is Fp8RowwiseSlice for n in names)
        if module.fused_projections != fused:
            module.fused_projections = fused


def _watched(model: nn.Module) -> list[nn.Module]:
    """The fused attentions ``model``'s sync hook runs over (the hook is registered once)."""
    attentions = getattr(model, _FUSED_ATTENTIONS, None)
    if attentions is None:
        attentions = []
        object.__setattr__(model, _FUSED_ATTENTIONS, attentions)
        model.register_forward_pre_hook(_sync_fusion)
    return attentions


def fuse_projections(model: nn.Module, collect: bool = True) -> int:
    """Fuse the q/k/v Fp8RowwiseLinears of known attention modules (``FUSABLE``) into one, as
    diffusers' ``fuse_qkv_projections`` does for plain Linears, keeping each projection under its
    name as an :class:`Fp8RowwiseSlice` of the fused weight (LoRA targets them by name).
    ``collect=False``: no ``gc.collect`` every 8 modules (the fast load path, whose unfused
    modules sit in no reference cycle and go as soon as they are replaced). Returns how many
    modules."""
    fused = 0
    attentions = None
    for module in model.modules():
        groups = FUSABLE.get(type(module).__name__)
        if not groups or getattr(module, "fused_projections", True):
            continue
        if getattr(module, _FUSED_NAMES, None) is not None:
            continue  # fused before; the hook decides when it runs fused
        present = [(names, out) for names, out in groups if hasattr(module, names[0])]
        parts = [[getattr(module, n, None) for n in names] for names, _ in present]
        if not parts or not all(type(m) is Fp8RowwiseLinear for p in parts for m in p):
            continue  # all or nothing: the fused processor path reads every fused Linear
        if any(len({m.in_features for m in p}) != 1 for p in parts):
            continue
        for (names, out), p in zip(present, parts, strict=True):
            owner = concat(p)
            owner.fused_parts = names
            setattr(module, out, owner)
            start = 0
            for n, m in zip(names, p, strict=True):
                setattr(module, n, Fp8RowwiseSlice(owner, start, start + m.out_features))
                start += m.out_features
        object.__setattr__(module, _FUSED_NAMES, tuple(n for names, _ in present for n in names))
        attentions = _watched(model) if attentions is None else attentions
        attentions.append(module)
        module.fused_projections = True
        fused += 1
        if collect and fused % 8 == 0:
            gc.collect()  # free the unfused copies as we go: bounds the peak while loading
    return fused
