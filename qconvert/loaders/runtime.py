"""Which kernels run a quantized weight on this device: the one hardware table.

The files always hold what torchao builds on Blackwell. Loading never changes them; it only
switches the runtime attributes torchao reads at matmul time (``act_quant_kwargs``,
``kernel_preference``), or swaps the Linear for qconvert's Hopper module, so the device runs a
path it has, and says which in one log line per format.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchao.prototype.mx_formats.mx_tensor import MXTensor
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
from torchao.quantization.quantize_.common.kernel_preference import KernelPreference
from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

log = logging.getLogger("qconvert.loaders")
QUANTIZED = (NVFP4Tensor, MXTensor, Float8Tensor)


@dataclass(frozen=True)
class Path:
    """One runtime path: what runs. ``apply`` adjusts a Linear in place, or returns the module
    that replaces it."""

    name: str
    description: str
    apply: Callable[[torch.nn.Linear], torch.nn.Module | None]


def _keep(linear: torch.nn.Linear) -> None:
    return None


def _weight_only(linear: torch.nn.Linear) -> None:
    # act_quant_kwargs=None: NVFP4Tensor's and Float8Tensor's linear dequantize the weight and
    # run F.linear with bf16 activations (what torchao's weight-only configs build).
    linear.weight.act_quant_kwargs = None


def _mx_emulated(linear: torch.nn.Linear) -> None:
    weight = linear.weight
    weight.kernel_preference = KernelPreference.EMULATED
    if weight.act_quant_kwargs is not None:
        weight.act_quant_kwargs = dataclasses.replace(
            weight.act_quant_kwargs, kernel_preference=KernelPreference.EMULATED
        )


def _hopper(linear: torch.nn.Linear) -> torch.nn.Module:
    from qconvert.loaders.hopper import HopperQuantLinear

    return HopperQuantLinear.from_linear(linear)


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

# (tensor type, device class) → path. Device classes: see device_class().
TABLE: dict[tuple[str, str], Path] = {
    ("NVFP4Tensor", "sm100"): NATIVE,
    ("MXTensor", "sm100"): NATIVE,
    ("Float8Tensor", "sm100"): FP8_ROWWISE,
    ("NVFP4Tensor", "sm89"): HOPPER,
    ("MXTensor", "sm89"): HOPPER,
    ("Float8Tensor", "sm89"): FP8_ROWWISE,
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
WHY = {
    "sm100": "Blackwell has NVFP4/MXFP8/FP8 tensor cores",
    "sm89": "Ada/Hopper have FP8 tensor cores but no NVFP4/MXFP8 ones",
    "sm80": "Ampere has bf16 tensor cores only",
    "gpu": "this GPU is older than sm80: no kernels of ours run on it",
    "cpu": "CPU has no FP8/NVFP4/MXFP8 kernels",
}


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


def prepare(
    model: torch.nn.Module, device: torch.device, dclass: str | None = None
) -> dict[str, str]:
    """Point every quantized Linear of ``model`` at the path its device runs.

    Returns {tensor type: path name}; logs one line per format. ``dclass`` overrides the
    device class (tests).
    """
    dclass = dclass or device_class(device)
    counts: dict[str, int] = {}
    chosen: dict[str, Path] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            weight = child.weight
            if not isinstance(weight, QUANTIZED):
                continue
            kind = type(weight).__name__
            path = TABLE[(kind, dclass)]
            if path is HOPPER and device.type == "cuda" and not _hopper_available():
                log.warning("qconvert: Triton is not importable; %s falls back to dequantize", kind)
                path = DEQUANT if kind == "NVFP4Tensor" else MX_EMULATED
            replacement = path.apply(child)
            if replacement is not None:
                setattr(parent, child_name, replacement)
            counts[kind] = counts.get(kind, 0) + 1
            chosen[kind] = path
    for kind, n in sorted(counts.items()):
        path = chosen[kind]
        log.warning(
            "qconvert: %d %s weights on %s run %s: %s (%s)",
            n,
            kind,
            device,
            path.name,
            path.description,
            WHY[dclass],
        )
    return {kind: path.name for kind, path in chosen.items()}
