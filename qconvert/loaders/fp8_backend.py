"""Which library runs qconvert's FP8 GEMMs: mslk's ``f8f8bf16_rowwise`` when it imports (only
for shapes cuBLAS refuses, unless ``QCONVERT_FP8_GEMM=mslk``), else ``torch._scaled_mm``."""

from __future__ import annotations

import functools
import logging
import os

import torch

_log = logging.getLogger(__name__)

__all__ = ["gemm_backend", "mslk_available", "mslk_forced"]


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
