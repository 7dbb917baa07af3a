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

log = logging.getLogger("qconvert.loaders")


@dataclass(frozen=True)
class Path:
    """One runtime path: what runs, and why this device gets it."""

    name: str
    description: str
    prepare: Callable[[torch.Tensor], None]  # adjusts one weight in place


def _keep(weight: torch.Tensor) -> None:
    return None


def _nvfp4_weight_only(weight: torch.Tensor) -> None:
    # act_quant_kwargs=None: NVFP4Tensor's linear dequantizes the weight and runs F.linear
    # with bf16 activations (what NVFP4WeightOnlyConfig builds).
    weight.act_quant_kwargs = None


def _mx_emulated(weight: torch.Tensor) -> None:
    weight.kernel_preference = KernelPreference.EMULATED
    if weight.act_quant_kwargs is not None:
        weight.act_quant_kwargs = dataclasses.replace(
            weight.act_quant_kwargs, kernel_preference=KernelPreference.EMULATED
        )


NATIVE = Path("native", "torchao's Blackwell kernels (block-scaled tensor cores)", _keep)
NVFP4_DEQUANT = Path(
    "weight-only dequantize",
    "weights dequantized to bf16 per matmul, activations stay bf16 (torchao NVFP4 weight-only)",
    _nvfp4_weight_only,
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
    ("NVFP4Tensor", "gpu"): NVFP4_DEQUANT,
    ("MXTensor", "gpu"): MX_EMULATED,
    ("NVFP4Tensor", "cpu"): NVFP4_DEQUANT,
    ("MXTensor", "cpu"): MX_EMULATED,
}
WHY = {
    "sm100": "Blackwell has NVFP4/MXFP8 tensor cores",
    "gpu": "this GPU has no NVFP4/MXFP8 tensor cores and qconvert has no fast path for it yet",
    "cpu": "CPU has no NVFP4/MXFP8 kernels",
}


def device_class(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm100" if major >= 10 else "gpu"


def prepare(model: torch.nn.Module, device: torch.device) -> dict[str, str]:
    """Switch every quantized Linear weight of ``model`` to the path its device runs.

    Returns {tensor type: path name}; logs one line per format.
    """
    dclass = device_class(device)
    counts: dict[str, int] = {}
    chosen: dict[str, str] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, NVFP4Tensor | MXTensor):
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
