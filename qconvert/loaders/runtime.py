"""Which kernels run a quantized weight on this device: the one hardware table.

The files always hold what torchao builds on Blackwell. Loading never changes them; it only
switches the runtime attributes torchao reads at matmul time (``act_quant_kwargs``,
``kernel_preference``) to a path the device can run, and says which in one log line.
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


@dataclass(frozen=True)
class Path:
    """One runtime path: what runs, and why this device gets it."""

    name: str
    description: str
    prepare: Callable[[torch.Tensor], None]  # adjusts one weight in place


def _keep(weight: torch.Tensor) -> None:
    return None


def _weight_only(weight: torch.Tensor) -> None:
    # act_quant_kwargs=None: NVFP4Tensor's and Float8Tensor's linear dequantize the weight and
    # run F.linear with bf16 activations (what torchao's weight-only configs build).
    weight.act_quant_kwargs = None


def _mx_emulated(weight: torch.Tensor) -> None:
    weight.kernel_preference = KernelPreference.EMULATED
    if weight.act_quant_kwargs is not None:
        weight.act_quant_kwargs = dataclasses.replace(
            weight.act_quant_kwargs, kernel_preference=KernelPreference.EMULATED
        )


NATIVE = Path("native", "torchao's Blackwell kernels (block-scaled tensor cores)", _keep)
DEQUANT = Path(
    "weight-only dequantize",
    "weights dequantized to bf16 per matmul, activations stay bf16 (torchao weight-only)",
    _weight_only,
)
FP8_ROWWISE = Path(
    "native",
    "torchao rowwise FP8: activations quantized per token, FP8 tensor-core GEMM",
    _keep,
)
MX_EMULATED = Path(
    "emulated",
    "activations quantized to MXFP8 and both operands dequantized for a bf16 matmul "
    "(torchao KernelPreference.EMULATED)",
    _mx_emulated,
)

# (tensor type, device class) → path. Device classes: see device_class().
TABLE: dict[tuple[str, str], Path] = {
    ("NVFP4Tensor", "sm100"): NATIVE,
    ("MXTensor", "sm100"): NATIVE,
    ("Float8Tensor", "sm100"): FP8_ROWWISE,
    ("NVFP4Tensor", "sm89"): DEQUANT,
    ("MXTensor", "sm89"): MX_EMULATED,
    ("Float8Tensor", "sm89"): FP8_ROWWISE,
    ("NVFP4Tensor", "gpu"): DEQUANT,
    ("MXTensor", "gpu"): MX_EMULATED,
    ("Float8Tensor", "gpu"): DEQUANT,
    ("NVFP4Tensor", "cpu"): DEQUANT,
    ("MXTensor", "cpu"): MX_EMULATED,
    ("Float8Tensor", "cpu"): DEQUANT,
}
WHY = {
    "sm100": "Blackwell has NVFP4/MXFP8/FP8 tensor cores",
    "sm89": "Ada/Hopper have FP8 tensor cores but no NVFP4/MXFP8 ones (qconvert's Hopper "
    "kernels are not wired in yet)",
    "gpu": "this GPU has no FP8/NVFP4/MXFP8 tensor cores",
    "cpu": "CPU has no FP8/NVFP4/MXFP8 kernels",
}


def device_class(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 10:
        return "sm100"
    return "sm89" if (major, minor) >= (8, 9) else "gpu"


def prepare(model: torch.nn.Module, device: torch.device) -> dict[str, str]:
    """Switch every quantized Linear weight of ``model`` to the path its device runs.

    Returns {tensor type: path name}; logs one line per format.
    """
    dclass = device_class(device)
    counts: dict[str, int] = {}
    chosen: dict[str, str] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, NVFP4Tensor | MXTensor | Float8Tensor):
            kind = type(weight).__name__
            path = TABLE[(kind, dclass)]
            path.prepare(weight)
            counts[kind] = counts.get(kind, 0) + 1
            chosen[kind] = path.name
    for kind, n in sorted(counts.items()):
        path = TABLE[(kind, dclass)]
        log.warning(
            "qconvert: %d %s weights on %s run %s: %s (%s)",
            n,
            kind,
            device,
            path.name,
            path.description,
            WHY[dclass],
        )
    return chosen
