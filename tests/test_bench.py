"""`qconvert bench` on CPU: tiny FLUX bf16 and quantized side by side into speed.json (the
--json schema), the card's speed table against bf16, the real-shape path's plumbing (a shrunk
config, since the real one needs a GPU), and its refusals."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from qconvert.cli import main
from qconvert.evaluate import bench_speed, evaluate_quality
from qconvert.evaluate.realshape import RealShapeSubject
from qconvert.tiny import flux as tiny_flux

STATS = {"median_s", "min_s", "max_s", "spread_pct", "n", "samples_s"}
TOP = {
    "kind", "schema", "setup", "device", "reference", "command", "family", "formats", "tiny",
    "real_shape", "settings", "options", "device_info", "versions", "results", "rows", "notes",
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Tiny ops on a shared CPU run faster unthreaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_schema(data: dict[str, Any], pipelines: list[str], batches: list[int]) -> None:
    assert set(data) == TOP and data["kind"] == "speed" and data["schema"] == 1
    assert data["device_info"]["type"] == "cpu" and "torch" in data["versions"]
    assert any("CPU figures say nothing about GPU speed" in n for n in data["notes"])
    results = data["results"]
    assert [(r["pipeline"], r["batch"]) for r in results] == [
        (p, b) for p in pipelines for b in batches
    ]
    for r in results:
        assert set(r["step"]) == STATS and set(r["end_to_end"]) == STATS
        assert 0 < r["step"]["min_s"] <= r["step"]["median_s"] <= r["step"]["max_s"]
        assert r["step"]["n"] == data["options"]["repeats"] == len(r["step"]["samples_s"])
        assert r["transformer_weights_gib"] > 0
    rows = data["rows"]
    assert [row["pipeline"] for row in rows] == [r["pipeline"] for r in results]
    for row, r in zip(rows, results, strict=True):
        assert row["step ms"] == pytest.approx(r["step"]["median_s"] * 1000, abs=0.01)
        base = next(x for x in results if x["pipeline"] == "bf16" and x["batch"] == r["batch"])
        ratio = r["end_to_end"]["median_s"] / base["end_to_end"]["median_s"]
        assert row["end-to-end vs bf16"] == pytest.approx(ratio, abs=1e-3)


def test_bench_tiny_flux_cli(converted: dict[str, Path], tmp_path: Path) -> None:
    out = Path(shutil.copytree(converted["fp8"], tmp_path / "fp8"))
    result = CliRunner().invoke(main, [
        "bench", str(out), "--steps", "1", "--repeats", "2", "--warmup", "1",
        "--e2e-repeats", "1", "--json", "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert json.loads((out / "speed.json").read_text()) == data
    check_schema(data, ["bf16", "fp8"], [1])
    assert not data["real_shape"] and data["tiny"] is True and data["formats"] == ["fp8"]
    load = data["results"][1]["load"]
    assert load["cold_method"] == "posix_fadvise(POSIX_FADV_DONTNEED)"
    assert load["cold_s"] > 0 and load["warm_s"] > 0
    assert "bf16 pipeline (local folder" in data["reference"]
    card = (out / "README.md").read_text()
    speed = card[card.index("## Speed") : card.index("## Files")]
    assert (
        "| pipeline | batch | step ms | step vs bf16 | end-to-end s | end-to-end vs bf16 |" in speed
    )
    assert "| bf16 | 1 |" in speed and "| fp8 | 1 |" in speed
    assert "Measured with torch " in speed and "CPU figures say nothing" in speed


@pytest.fixture
def shrunk() -> RealShapeSubject:
    """The real-shape path with FLUX shrunk to the tiny transformer's config (the VAE stays
    FLUX.1-dev's): what differs from --real-shape on a GPU is only the size."""
    return RealShapeSubject("flux", ["fp8"], seed=0, overrides=dict(tiny_flux.TRANSFORMER))


def test_real_shape_plumbing(shrunk: RealShapeSubject, tmp_path: Path) -> None:
    data = bench_speed(
        shrunk, steps=1, height=16, width=16, repeats=1, warmup=0, e2e_repeats=1,
        batches=(1, 2), results=tmp_path, progress=False,
    )  # fmt: skip
    assert data["real_shape"] is True and "random weights" in data["setup"]
    check_schema(data, ["bf16", "fp8"], [1, 2])
    assert data["results"][2]["runtime"] == {"Float8Tensor": "weight-only dequantize"}
    assert "build_s" in data["results"][0]["load"]
    assert "load s (cold / warm)" not in data["rows"][0]  # real shape: no files to load
    assert json.loads((tmp_path / "speed.json").read_text())["rows"] == data["rows"]
    small = {"steps": 1, "height": 16, "width": 16, "lpips": None, "progress": False}
    two = RealShapeSubject("flux", ["fp8", "nvfp4"], seed=0, overrides=dict(tiny_flux.TRANSFORMER))
    got = evaluate_quality(two, num_prompts=1, cache_root=tmp_path / "c", results=tmp_path, **small)
    assert got["kind"] == "quality-set" and list(got["formats"]) == ["fp8", "nvfp4"]
    for fmt, quality in got["formats"].items():  # one report and folder per format
        assert quality["format"] == fmt and quality["real_shape"]
        assert quality["weights"]["layers"] == 20
        assert "quality figures are meaningless" in quality["setup"]
        on_disk = json.loads((tmp_path / fmt / "quality.json").read_text())
        assert on_disk["format"] == fmt and (tmp_path / fmt / "quality.png").is_file()
    fp8, nvfp4 = (got["formats"][f]["prompts"][0] for f in ("fp8", "nvfp4"))
    assert fp8["seconds_bf16"] == nvfp4["seconds_bf16"]  # the bf16 image came from the cache
    assert fp8["psnr_db"] != nvfp4["psnr_db"]


def test_bench_refusals(converted: dict[str, Path], tmp_path: Path) -> None:
    out = Path(shutil.copytree(converted["fp8"], tmp_path / "fp8"))
    cases = {
        (str(out), "--cuda-graphs"): "--cuda-graphs needs a CUDA device",
        ("flux", "--real-shape", "--format", "fp8"): "--real-shape needs a CUDA GPU",
        ("flux", "--real-shape", "--format", "int3", "--device", "cpu"): "unknown format 'int3'",
        (str(out), "--format", "fp8"): "--format applies to --real-shape",
    }  # fmt: skip
    for args, message in cases.items():
        result = CliRunner().invoke(main, ["bench", *args, "-q"])
        assert result.exit_code == 1, (args, result.output)
        assert result.output.strip().splitlines()[-1].startswith("Error: ")
        assert message in result.output, (args, result.output)
    result = CliRunner().invoke(main, ["bench", str(out), "--batch", "0"])
    assert result.exit_code == 2 and "batch sizes must be at least 1" in result.output
    assert not (out / "speed.json").exists()
