"""Shared fixtures: the tiny FLUX source and its conversions, built once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX pipeline folder (bf16 transformer), as a local diffusers source."""
    from qconvert.tiny import flux as tiny_flux

    path = tmp_path_factory.mktemp("src") / "tiny-flux"
    tiny_flux.build(path, seed=0)
    return path


@pytest.fixture(scope="session")
def converted(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny FLUX converted to each format (sharded: --max-shard-size 10 MB)."""
    from qconvert.convert import convert

    root = tmp_path_factory.mktemp("out")
    out = {}
    for fmt in ("nvfp4", "mxfp8", "fp8"):
        out[fmt] = convert(
            root / fmt, fmt=fmt, source=tiny_flux, max_shard_size=10_000_000, progress=False
        ).output
    return out


@pytest.fixture(scope="session")
def family_sources(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny pipeline folder of every family (built once per session)."""
    from qconvert import tiny

    out = {"flux": tiny_flux}
    for name in ("qwenimage", "ltx2"):
        out[name] = tmp_path_factory.mktemp(name) / "src"
        tiny.build(name, out[name], seed=0)
    return out


@pytest.fixture(scope="session")
def family_outputs(
    family_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    """tiny Qwen-Image and LTX-2 converted to nvfp4 and mxfp8 (built once per session)."""
    from qconvert.convert import convert

    root = tmp_path_factory.mktemp("families")
    return {
        (family, fmt): convert(
            root / f"{family}-{fmt}",
            family=family,
            fmt=fmt,
            source=family_sources[family],
            progress=False,
        ).output
        for family in ("qwenimage", "ltx2")
        for fmt in ("nvfp4", "mxfp8")
    }


@pytest.fixture(scope="module")
def offline_single_thread() -> Iterator[None]:
    """No Hub access, and one thread: tiny ops on a shared CPU run faster unthreaded. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("offline_single_thread")``."""
    import huggingface_hub.constants

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
