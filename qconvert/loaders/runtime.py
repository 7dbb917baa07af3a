"""Which kernels run a quantized weight on this device: the one hardware table.

The files always hold what torchao builds on Blackwell. Loading never changes them; it only
switches the runtime attributes torchao reads at matmul time (``act_quant_kwargs``,
``kernel_preference``), or swaps the Linear for qconvert's Hopper module, so the device runs a
path it has, and says which in one log line per format.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchao.prototype.mx_formats.mx_tensor import MXTensor
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
from torchao.quantization.quantize_.common.kernel_preference import KernelPreference
from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

from qconvert.loaders.compat import RuntimeLinear, install_requantize, record_in_place

log = logging.getLogger("qconvert.loaders")
QUANTIZED = (NVFP4Tensor, MXTensor, Float8Tensor)


@dataclass(frozen=True)
class Path:
    """One runtime path: what runs. ``apply`` adjusts a Linear in place, or returns the module
    that replaces it."""

    name: str
    description: str
    apply: Callable[[torch.nn.Linear], torch.nn.Module | None]


# The in-place paths first record the weight's saved attributes, format and path on the Linear
# (compat.record_in_place: state_dict reports the file's tensor; a LoRA merge requantizes).


def _keep(linear: torch.nn.Linear) -> None:
    record_in_place(linear, _keep)


def _weight_only(linear: torch.nn.Linear) -> None:
    record_in_place(linear, _weight_only)
    # act_quant_kwargs=None: NVFP4Tensor's and Float8Tensor's linear dequantize the weight and
    # run F.linear with bf16 activations (what torchao's weight-only configs build).
    linear.weight.act_quant_kwargs = None


def _mx_emulated(linear: torch.nn.Linear) -> None:
    record_in_place(linear, _mx_emulated)
    weight = linear.weight
    weight.kernel_preference = KernelPreference.EMULATED
    if weight.act_quant_kwargs is not None:
        weight.act_quant_kwargs = dataclasses.replace(
            weight.act_quant_kwargs, kernel_preference=KernelPreference.EMULATED
        )


def _hopper(linear: torch.nn.Linear) -> torch.nn.Module:
    from qconvert.loaders.hopper import HopperQuantLinear

    return HopperQuantLinear.from_linear(linear)


def _fp8_fast(linear: torch.nn.Linear) -> torch.nn.Module:
    from qconvert.loaders.fp8 import Fp8RowwiseLinear

    return Fp8RowwiseLinear.from_linear(linear)


NATIVE = Path("native", "torchao's Blackwell kernels (block-scaled tensor cores)", _keep)
DEQUANT = Path(
    "weight-only dequantize",
    "weights dequantized to bf16 per matmul, activations stay bf16 (torchao weight-only)",
    _weight_only,
)
MX_EMULATED = Path(
    "emulated",
    "activations quantized to MXFP8 and both operands dequantized for a bf16 matmul "
    "(torchao KernelPreference.EMULATED)",
    _mx_emulated,
)
FP8_ROWWISE = Path(
    "native",
    "torchao rowwise FP8: activations quantized per token, FP8 tensor-core GEMM",
    _keep,
)
HOPPER = Path(
    "qconvert hopper",
    "weights stay quantized in memory; a Triton kernel dequantizes them to bf16 at ~2.4 TB/s "
    "for cuBLAS (or a fused GEMM for small batches), activations stay bf16",
    _hopper,
)

FP8_FAST = Path(
    "qconvert fp8",
    "activations quantized per token by one fused Triton kernel, then a rowwise FP8 "
    "tensor-core GEMM with the bias fused (FLUX attention: q/k/v fused into one GEMM)",
    _fp8_fast,
)

# (tensor type, device class) → path. Device classes: see device_class().
TABLE: dict[tuple[str, str], Path] = {
    ("NVFP4Tensor", "sm100"): NATIVE,
    ("MXTensor", "sm100"): NATIVE,
    ("Float8Tensor", "sm100"): FP8_ROWWISE,
    ("NVFP4Tensor", "sm89"): HOPPER,
    ("MXTensor", "sm89"): HOPPER,
    ("Float8Tensor", "sm89"): FP8_FAST,
    ("NVFP4Tensor", "sm80"): HOPPER,
    ("MXTensor", "sm80"): HOPPER,
    ("Float8Tensor", "sm80"): DEQUANT,
    ("NVFP4Tensor", "gpu"): DEQUANT,
    ("MXTensor", "gpu"): MX_EMULATED,
    ("Float8Tensor", "gpu"): DEQUANT,
    ("NVFP4Tensor", "cpu"): DEQUANT,
    ("MXTensor", "cpu"): MX_EMULATED,
    ("Float8Tensor", "cpu"): DEQUANT,
}
# What runs where Triton is missing on a GPU that would use our kernels.
FALLBACK = {"NVFP4Tensor": DEQUANT, "MXTensor": MX_EMULATED, "Float8Tensor": FP8_ROWWISE}
WHY = {
    "sm100": "Blackwell has NVFP4/MXFP8/FP8 tensor cores",
    "sm89": "Ada/Hopper have FP8 tensor cores but no NVFP4/MXFP8 ones",
    "sm80": "Ampere has bf16 tensor cores only",
    "gpu": "this GPU is older than sm80: no kernels of ours run on it",
    "cpu": "CPU has no FP8/NVFP4/MXFP8 kernels",
}
# Names of the device classes (device_class) for people: cards, logs.
DEVICE_LABELS = {
    "sm100": "NVIDIA Blackwell (compute capability 10.0+)",
    "sm89": "NVIDIA Ada / Hopper (compute capability 8.9, 9.x)",
    "sm80": "NVIDIA Ampere (compute capability 8.0–8.7)",
    "gpu": "older CUDA GPUs (before sm80)",
    "cpu": "CPU",
}
NATIVE_PATH = NATIVE.name  # the path on which weights run as saved


def device_class(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 10:
        return "sm100"
    if (major, minor) >= (8, 9):
        return "sm89"
    return "sm80" if major >= 8 else "gpu"


def _hopper_available() -> bool:
    from qconvert.loaders import hopper

    return hopper.triton is not None


def _describe(path: Path) -> str:
    if path is FP8_FAST:
        from qconvert.loaders.fp8 import gemm_backend

        return f"{path.description} (GEMM: {gemm_backend()})"
    return path.description


def choose(weight: torch.Tensor, device: torch.device, dclass: str) -> tuple[Path, str]:
    """The path for one quantized weight on this device, and why (for the log line)."""
    kind = type(weight).__name__
    path = TABLE[(kind, dclass)]
    why = WHY[dclass]
    if path in (HOPPER, FP8_FAST) and device.type == "cuda" and not _hopper_available():
        path = FALLBACK[kind]
        why += "; Triton is not importable, so qconvert's kernels cannot run"
    if path is FP8_FAST:
        from qconvert.loaders.fp8 import is_rowwise_e4m3

        if not is_rowwise_e4m3(weight):
            path = FP8_ROWWISE
            why += "; qconvert's FP8 kernels take rowwise e4m3 weights only"
    return path, why


def prepare(
    model: torch.nn.Module,
    device: torch.device,
    dclass: str | None = None,
    fuse_qkv: bool = True,
) -> dict[str, str]:
    """Point every quantized Linear of ``model`` at the path its device runs.

    Returns {tensor type: path name}; logs one line per format and path. ``dclass`` overrides
    the device class (tests). ``fuse_qkv``: on the qconvert fp8 path, fuse attention q/k/v
    projections into one GEMM where the model's processor supports it (exact).
    """
    dclass = dclass or device_class(device)
    counts: dict[tuple[str, Path, str], int] = {}
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or isinstance(child, RuntimeLinear):
                continue  # (a RuntimeLinear is prepared already)
            weight = child.weight
            if not isinstance(weight, QUANTIZED):
                continue
            path, why = choose(weight, device, dclass)
            replacement = path.apply(child)
            if replacement is not None:
                setattr(parent, child_name, replacement)
                replaced += 1
                if replaced % 64 == 0:
                    gc.collect()  # a replaced Linear sits in a reference cycle: free it
            key = (type(weight).__name__, path, why)
            counts[key] = counts.get(key, 0) + 1
    for (kind, path, why), n in sorted(counts.items(), key=lambda kv: kv[0][0]):
        log.warning(
            "qconvert: %d %s weights on %s run %s: %s (%s)",
            n, kind, device, path.name, _describe(path), why,
        )  # fmt: skip
    if fuse_qkv and any(path is FP8_FAST for _, path, _ in counts):
        from qconvert.loaders.fp8 import fuse_projections

        fused = fuse_projections(model)
        if fused:
            log.warning(
                "qconvert: fused q/k/v of %d attention modules into one FP8 GEMM each "
                "(one activation quantization per input; exact: rowwise weights)",
                fused,
            )
    if counts:
        install_requantize(model)  # (fastload: the same, on the model it builds)
    if replaced:
        # Replaced Linears (and their GPU weights, e.g. NVFP4's swizzled scales) sit in
        # reference cycles; without this they outlive the load until Python's next collection.
        gc.collect()
    return {kind: path.name for kind, path, _ in counts}


def report(
    counts: dict[tuple[str, Path, str], int], device: torch.device, fused: int = 0
) -> dict[str, str]:
    """The log lines ``prepare`` writes, for a loader that applied the paths itself
    (``fastload``): {(tensor type, path, why): count} and the fused attention modules.
    Returns what ``prepare`` returns."""
    for (kind, path, why), n in sorted(counts.items(), key=lambda kv: kv[0][0]):
        log.warning(
            "qconvert: %d %s weights on %s run %s: %s (%s)",
            n, kind, device, path.name, _describe(path), why,
        )  # fmt: skip
    if fused:
        log.warning(
            "qconvert: fused q/k/v of %d attention modules into one FP8 GEMM each "
            "(one activation quantization per input; exact: rowwise weights)",
            fused,
        )
    return {kind: path.name for kind, path, _ in counts}
