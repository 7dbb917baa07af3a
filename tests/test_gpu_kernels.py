"""The Hopper Triton kernels (qconvert/loaders/hopper.py) against torchao's dequantize.

Reference: ``W.dequantize(torch.float32)`` from torchao, then ``x.float() @ W.T`` in fp32
(TF32 off). Every kernel output is poisoned with NaN first and every element is checked.

Bounds (bf16 operands, fp32 accumulation, bf16 output):
- dequantize kernel: bit-equal to torchao's ``W.dequantize(torch.bfloat16)``;
- GEMMs: ``|out - ref| <= 2^-8 |ref| + 2^-8 (|x| @ |W|^T)`` per element (output rounding 2^-9,
  bf16 weight rounding <= 2^-9 of each product on the dequantize path, fp32 accumulation), and
  ``||out - ref|| / ||ref|| <= 5e-3``.

The GPU tests are skipped without CUDA. The first three tests (repacking, CPU fallback) run
anywhere. ``QCONVERT_INTERPRET_KERNELS=1`` with ``TRITON_INTERPRET=1`` runs the small GPU cases
on the CPU through Triton's interpreter (no inline asm there; its fp32 -> bf16 cast truncates,
so exactness is checked to one bf16 ulp), for debugging index math without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from qconvert.formats import FORMATS
from qconvert.loaders import hopper
from qconvert.loaders.hopper import FusedConfig, HopperQuantLinear

INTERPRET = (
    os.environ.get("QCONVERT_INTERPRET_KERNELS") == "1"
    and os.environ.get("TRITON_INTERPRET") == "1"
    and hopper.HAS_TRITON
)
HAS_GPU = torch.cuda.is_available() and hopper.HAS_TRITON
DEVICE = "cuda" if HAS_GPU else "cpu"
gpu = pytest.mark.skipif(not (HAS_GPU or INTERPRET), reason="needs CUDA and Triton")
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and Triton (no interpreter)")

FMTS = ("nvfp4", "mxfp8")
M_FLUX = 4096 + 512
FLUX_NK = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (3072, 15360)]
MIN_K = {"nvfp4": 16, "mxfp8": 32}


def _weight(fmt: str, n: int, k: int, seed: int, device: str = DEVICE) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(device)
    return FORMATS[fmt].quantize(w)


def _x(m: int, k: int, seed: int, device: str = DEVICE) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)


def _bias(n: int, seed: int, device: str = DEVICE) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16).to(device)


def _check_gemm(out: torch.Tensor, x: torch.Tensor, qw: torch.Tensor, bias: torch.Tensor | None):
    """Every element within the stated bound; the relative norm error under 5e-3."""
    w32 = qw.dequantize(torch.float32)
    ref = x.float() @ w32.T
    mag = x.float().abs() @ w32.abs().T
    if bias is not None:
        ref = ref + bias.float()
        mag = mag + bias.float().abs()
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    o = out.float()
    assert bool(torch.isfinite(o).all()), f"{int((~torch.isfinite(o)).sum())} non-finite"
    err = (o - ref).abs()
    bound = 2.0**-8 * ref.abs() + 2.0**-8 * mag
    bad = err > bound
    if bool(bad.any()):
        worst = int((err / bound).argmax())
        row, col = divmod(worst, err.shape[1])
        raise AssertionError(
            f"{int(bad.sum())} of {err.numel()} elements out of bound; worst at ({row}, {col}): "
            f"out {float(o[row, col]):.6g} ref {float(ref[row, col]):.6g} "
            f"bound {float(bound[row, col]):.3g}"
        )
    rel = float((o - ref).norm() / ref.norm())
    assert rel <= 5e-3, rel
    return rel


def _assert_bits_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == ref.shape
    if INTERPRET:  # the interpreter's fp32 -> bf16 cast truncates: allow one ulp
        diff = (out.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
        assert int(diff.max()) <= 1
        return
    bad = out.view(torch.int16) != ref.view(torch.int16)
    assert not bool(bad.any()), f"{int(bad.sum())} of {out.numel()} differ"


def _poisoned(shape: tuple[int, int], device: str = DEVICE) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.bfloat16, device=device)


# --- anywhere (CPU CI): repacking and the pure-torch fallback ---------------------------------


@pytest.mark.parametrize("rows,cols", [(16, 1), (128, 4), (130, 7), (300, 96), (3072, 192)])
def test_unswizzle_inverts_torchao_to_blocked(rows: int, cols: int) -> None:
    from torchao.prototype.mx_formats.utils import to_blocked

    scales = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
    blocked = to_blocked(scales)
    assert torch.equal(hopper.unswizzle_scales(blocked, rows, cols), scales)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (272, 160)])
def test_pack_weight_cpu_dequant_is_bit_exact(fmt: str, n: int, k: int) -> None:
    qw = _weight(fmt, n, k, seed=n + k, device="cpu")
    packed = hopper.pack_weight(qw)
    assert packed.qdata.data_ptr() == qw.qdata.data_ptr()  # qdata reused, not copied
    assert packed.nbytes == hopper.weight_bytes(fmt, n, k)
    got = hopper._dequant_torch(packed.qdata, packed.scale, packed.tensor_scale, fmt)
    ref = qw.dequantize(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("fmt", FMTS)
def test_module_cpu_fallback(fmt: str) -> None:
    lin = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)
    qw = _weight(fmt, 48, 64, seed=3, device="cpu")
    lin.weight = nn.Parameter(qw, requires_grad=False)
    mod = HopperQuantLinear.from_linear(lin)
    x = _x(10, 64, seed=4, device="cpu").view(2, 5, 64)
    y = mod(x)
    assert y.shape == (2, 5, 48)
    _check_gemm(y.view(10, 48), x.view(10, 64), qw, lin.bias.detach())


# --- the kernels --------------------------------------------------------------------------------


def _dequant_cases() -> list[tuple[str, int, int]]:
    cases = []
    for fmt in FMTS:
        cases += [(fmt, 16, MIN_K[fmt]), (fmt, 48, 96), (fmt, 304, 160)]
        if not INTERPRET:
            cases += [(fmt, n, k) for n, k in FLUX_NK]
    return cases


@gpu
@pytest.mark.parametrize("fmt,n,k", _dequant_cases())
def test_dequant_kernel_bit_exact(fmt: str, n: int, k: int) -> None:
    qw = _weight(fmt, n, k, seed=n * 7 + k)
    p = hopper.pack_weight(qw)
    ref = qw.dequantize(torch.bfloat16)
    for cfg in hopper.DEQUANT_CONFIGS:
        out = _poisoned((n, k))
        hopper.launch_dequant(p.qdata, p.scale, p.tensor_scale, fmt, out=out, config=cfg)
        _assert_bits_equal(out, ref)


@gpu_only
@pytest.mark.parametrize("fmt", FMTS)
def test_dequant_kernel_without_native_fp8(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sm80 path (e4m3 decoded from bits) gives the same bits."""
    monkeypatch.setattr(hopper, "_fp8_native", lambda device: False)
    qw = _weight(fmt, 304, 3072, seed=11)
    p = hopper.pack_weight(qw)
    out = _poisoned((304, 3072))
    hopper.launch_dequant(p.qdata, p.scale, p.tensor_scale, fmt, out=out)
    _assert_bits_equal(out, qw.dequantize(torch.bfloat16))


def _small_cases() -> list[tuple[str, int, int, int, bool]]:
    cases = []
    for fmt in FMTS:
        kmin = MIN_K[fmt]
        cases += [
            (fmt, 1, 64, 256, True),  # M = 1
            (fmt, 77, 96, 512, True),  # M = 77 (T5-like prompt)
            (fmt, 300, 48, 160, False),  # M not a multiple of any tile, K not of BLOCK_K
            (fmt, 5, 16, kmin, True),  # N = 16, K at the block minimum
            (fmt, 130, 16, kmin, False),
        ]
    return cases


def _configs_for(m: int) -> list[FusedConfig]:
    if INTERPRET:  # the interpreter is slow: small tiles only
        return [FusedConfig(16, 16, 32, 4, 1), FusedConfig(16, 32, 64, 4, 1, swap=True)]
    return [hopper.default_config(m), *hopper.candidate_configs(m)[:2]]


@gpu
@pytest.mark.parametrize("fmt,m,n,k,with_bias", _small_cases())
def test_fused_kernel_odd_shapes(fmt: str, m: int, n: int, k: int, with_bias: bool) -> None:
    qw = _weight(fmt, n, k, seed=m + n + k)
    p = hopper.pack_weight(qw)
    x = _x(m, k, seed=m * 3 + k)
    bias = _bias(n, seed=n) if with_bias else None
    for cfg in _configs_for(m):
        out = _poisoned((m, n))
        hopper.launch_fused(x, p.qdata, p.scale, p.tensor_scale, bias, fmt, cfg, out=out)
        _check_gemm(out, x, qw, bias)


@gpu_only
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("use_asm", [True, False])
def test_every_fused_config(fmt: str, use_asm: bool) -> None:
    """Every config the autotuner may pick, on a shape that none tiles evenly in M."""
    m, n, k = 336, 384, 512  # M % 16 == 0 (as FLUX) but no tile divides it
    qw = _weight(fmt, n, k, seed=21)
    p = hopper.pack_weight(qw)
    x = _x(m, k, seed=22)
    bias = _bias(n, seed=23)
    for cfg in hopper.FUSED_CONFIGS:
        out = _poisoned((m, n))
        hopper.launch_fused(
            x, p.qdata, p.scale, p.tensor_scale, bias, fmt, cfg, out=out, use_asm=use_asm
        )
        _check_gemm(out, x, qw, bias)


@gpu_only
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n,k", FLUX_NK)
def test_flux_shapes_all_paths(fmt: str, n: int, k: int) -> None:
    """M = 4608 tokens: fused kernel (two tile shapes), dequantize + mm, and the auto op."""
    qw = _weight(fmt, n, k, seed=n + 2 * k)
    p = hopper.pack_weight(qw)
    x = _x(M_FLUX, k, seed=k)
    bias = _bias(n, seed=n + 1)
    for cfg in (FusedConfig(128, 256, 64, 8, 3), FusedConfig(256, 128, 64, 8, 3, swap=True)):
        out = _poisoned((M_FLUX, n))
        hopper.launch_fused(x, p.qdata, p.scale, p.tensor_scale, bias, fmt, cfg, out=out)
        _check_gemm(out, x, qw, bias)
    args = (x, p.qdata, p.scale, p.tensor_scale, bias, fmt)
    _check_gemm(hopper._dequant_mm(*args), x, qw, bias)
    _check_gemm(torch.ops.qconvert.hopper_linear(*args), x, qw, bias)


def _quant_linear(fmt: str, n: int, k: int, bias: bool, impl: str) -> HopperQuantLinear:
    lin = nn.Linear(k, n, bias=bias, dtype=torch.bfloat16, device=DEVICE)
    with torch.no_grad():
        if bias:
            lin.bias.copy_(_bias(n, seed=5))
    lin.weight = nn.Parameter(_weight(fmt, n, k, seed=n + k), requires_grad=False)
    return HopperQuantLinear.from_linear(lin, impl=impl)


@gpu_only
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("impl", hopper.IMPLS)
def test_module_forward(fmt: str, impl: str) -> None:
    n, k = 768, 512
    mod = _quant_linear(fmt, n, k, bias=True, impl=impl)
    qw = _weight(fmt, n, k, seed=n + k)
    weight_bytes = sum(b.numel() * b.element_size() for b in mod.buffers())
    assert weight_bytes < 0.6 * n * k * 2  # never a bf16 copy of the weight
    for shape in ((1, k), (2, 77, k), (3, 1000, k)):
        x = _x(int(torch.tensor(shape[:-1]).prod()), k, seed=len(shape)).view(shape)
        y = mod(x)
        assert y.shape == (*shape[:-1], n)
        _check_gemm(y.reshape(-1, n), x.reshape(-1, k), qw, mod.bias)


def _linear_cpu(fmt: str, n: int, k: int) -> nn.Linear:
    lin = nn.Linear(k, n, dtype=torch.bfloat16)
    lin.weight = nn.Parameter(_weight(fmt, n, k, seed=n, device="cpu"), requires_grad=False)
    return lin


@pytest.mark.parametrize("fmt", FMTS)
def test_torch_compile_fullgraph_cpu(fmt: str) -> None:
    """The compiled branch (rule by row count) traces on any device (aot_eager backend)."""
    torch._dynamo.reset()
    mods = nn.Sequential(
        HopperQuantLinear.from_linear(_linear_cpu(fmt, 64, 128)), nn.GELU(),
        HopperQuantLinear.from_linear(_linear_cpu(fmt, 128, 64)),
    )  # fmt: skip
    for m in (3, 40):  # fused below DEFAULT_FUSED_MAX_M, dequantize + matmul above
        x = _x(m, 128, seed=m, device="cpu")
        got = torch.compile(mods, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(got, mods(x))


@gpu_only
@pytest.mark.parametrize("fmt", FMTS)
def test_torch_compile_fullgraph(fmt: str) -> None:
    torch._dynamo.reset()
    n, k = 512, 256
    mods = nn.Sequential(
        _quant_linear(fmt, n, k, bias=True, impl="auto"),
        nn.GELU(approximate="tanh"),
        _quant_linear(fmt, k, n, bias=False, impl="fused"),
        _quant_linear(fmt, n, k, bias=True, impl="dequant_mm"),
    )
    x = _x(2 * 333, k, seed=9).view(2, 333, k)
    eager = mods(x)
    compiled = torch.compile(mods, fullgraph=True)
    got = compiled(x)
    torch.testing.assert_close(got, eager, rtol=1e-2, atol=1e-2)
    x2 = _x(2 * 333, k, seed=10).view(2, 333, k)
    torch.testing.assert_close(compiled(x2), mods(x2), rtol=1e-2, atol=1e-2)


@gpu_only
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("impl", hopper.IMPLS)
def test_cuda_graph_capture(fmt: str, impl: str) -> None:
    n, k, m = 1024, 512, 300
    mod = _quant_linear(fmt, n, k, bias=True, impl=impl)
    qw = _weight(fmt, n, k, seed=n + k)
    static_x = _x(m, k, seed=30)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: autotuning and compilation happen here
            mod(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = mod(static_x)
    for seed in (31, 32):
        x = _x(m, k, seed=seed)
        static_x.copy_(x)
        static_y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check_gemm(static_y, x, qw, mod.bias)
