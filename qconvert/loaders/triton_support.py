"""Triton, when installed, and the one way our kernels become ops torch.compile traces into.

CPU-only installs have no Triton: ``HAS_TRITON`` is False there and the kernel modules route
every tensor through their plain-torch code.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # Triton is optional: CPU-only installs have none.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "interpret", "tl", "traceable_op", "triton"]


def interpret() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1, for debugging)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def traceable_op(name: str, fn: Any) -> Any:
    """Register ``fn`` as a functional op that torch.compile traces into.

    With Triton: a ``torch.library.triton_op`` (inductor launches its kernels from generated
    code, no Python call per step). Without: a custom op whose fake implementation is ``fn``
    itself, which must then take non-CUDA tensors through plain torch code.
    """
    if HAS_TRITON:
        return torch.library.triton_op(name, mutates_args=())(fn)
    op = torch.library.custom_op(name, mutates_args=())(fn)
    op.register_fake(fn)
    return op
