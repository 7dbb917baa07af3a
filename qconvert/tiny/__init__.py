"""The embedded tiny pipelines: real diffusers/transformers classes at small fixed configs with
seeded random weights and locally built tokenizers, one module per family.

A family recipe names its tiny build by family name (``tiny = "flux"``); :func:`build` and
:func:`call_kwargs` are the only ways in, so a renamed module fails here, loudly, not in data.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

FAMILIES = ("flux", "qwenimage", "ltx2")


def module(family: str) -> ModuleType:
    """The tiny module of ``family`` (``qconvert.tiny.flux`` for "flux")."""
    if family not in FAMILIES:
        raise KeyError(f"no tiny build for family {family!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(f"qconvert.tiny.{family}")


def build(family: str, dst: Path, seed: int = 0) -> None:
    """Write the tiny ``family`` pipeline (a diffusers folder, bf16 transformer) to ``dst``."""
    module(family).build(Path(dst), seed)


def build_pipeline(family: str, seed: int = 0) -> Any:
    """The tiny ``family`` pipeline in memory."""
    return module(family).build_pipeline(seed)


def call_kwargs(family: str) -> dict[str, Any]:
    """Small pipeline-call settings that run the tiny ``family`` pipeline in seconds."""
    return dict(module(family).CALL)
