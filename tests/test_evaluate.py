"""`qconvert eval`: tiny FLUX / Qwen-Image / LTX-2 evaluated end to end on CPU (quality.json,
picture, card), the generation cache (a second format reuses bf16, Ctrl-C loses nothing),
metrics checked against direct computations, and the bad-input rules."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from qconvert.cli import main
from qconvert.convert import convert
from qconvert.evaluate import EvalError, evaluate_quality, metrics, report, subject_for
from qconvert.evaluate.cache import Sample
from qconvert.evaluate.lpips import LPIPS
from qconvert.evaluate.quality import card_rows

FAST = {"steps": 1, "lpips": None, "progress": False}
pytestmark = pytest.mark.usefixtures("offline_single_thread")


def random_backbone(net: str = "alex") -> dict[str, torch.Tensor]:
    """A backbone state dict in torchvision's layout with seeded random weights."""
    torch.manual_seed(0)
    return {f"features.{k}": v for k, v in LPIPS(net).features.state_dict().items()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generation cache for the module: tests share the bf16 tiny FLUX generations."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def flux_fp8(converted: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy (measurement files are written into it)."""
    return Path(shutil.copytree(converted["fp8"], tmp_path / "flux-fp8"))


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def generations(cache: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (cache / "generations").rglob("*.safetensors")}


def test_tiny_flux_end_to_end_with_interruption(flux_fp8: Path, cache: Path) -> None:
    """An interrupted run keeps what it finished; the rerun (CLI) completes from there and
    writes quality.json, the picture and the card."""
    subject = subject_for(flux_fp8, cache_root=cache)
    real_load = subject.load
    calls: list[str] = []

    class Interrupting:  # the pipeline, stopped by Ctrl-C at its third call
        def __init__(self, pipe: Any) -> None:
            self.pipe = pipe

        def __getattr__(self, name: str) -> Any:
            return getattr(self.pipe, name)

        def __call__(self, **kwargs: Any) -> Any:
            calls.append(str(kwargs.get("prompt")))
            if len(calls) == 3:  # the forward check's capture, prompt 1, then prompt 2
                raise KeyboardInterrupt
            return self.pipe(**kwargs)

    def load(variant: str | None, device: torch.device) -> Any:
        return Interrupting(real_load(variant, device))

    subject.load = load
    with pytest.raises(KeyboardInterrupt):
        evaluate_quality(subject, num_prompts=2, cache_root=cache, **FAST)
    kept = generations(cache)
    assert len(kept) == 3  # the weight SQNR, the forward check, prompt 1's bf16 image
    assert not (flux_fp8 / "quality.json").exists()

    result = cli("eval", str(flux_fp8), "--num-prompts", "2", "--steps", "1", "--lpips", "off",
                 "--cache-dir", str(cache), "-q", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert all(generations(cache)[k] == t for k, t in kept.items())  # nothing redone
    on_disk = json.loads((flux_fp8 / "quality.json").read_text())
    assert on_disk == data and data["kind"] == "quality" and data["format"] == "fp8"
    assert [r["prompt"] for r in data["prompts"]] == [
        'A neon sign above a diner door that reads "OPEN 24 HOURS"',
        "Three red apples and two green pears on a white plate",
    ]
    for row in data["prompts"]:
        assert 20 < row["psnr_db"] < 99 and not row["identical"] and 0.5 < row["ssim"] < 1
    assert 0 < data["forward"]["rel_l2"] < 0.05
    assert data["weights"]["layers"] == 20 and 25 < data["weights"]["mean_db"] < 40
    assert data["lpips"] == {"net": None, "available": False, "why": "turned off (--lpips off)"}
    assert (
        data["settings"]["call"]["height"] == 32
        and data["settings"]["call"]["num_inference_steps"] == 1
    )
    picture = Image.open(flux_fp8 / "quality.png")
    assert picture.format == "PNG" and picture.width >= 2 * 128
    card = (flux_fp8 / "README.md").read_text()
    quality = card[card.index("## Quality") : card.index("## Files")]
    assert "| PSNR vs bf16 (dB) |" in quality and "![bf16 and quantized" in quality
    assert "(quality.png)" in quality and "CPU figures say nothing" in quality


def test_second_format_reuses_the_bf16_generations(
    converted: dict[str, Path], tmp_path: Path, cache: Path
) -> None:
    out = Path(shutil.copytree(converted["mxfp8"], tmp_path / "mx"))
    subject = subject_for(out, cache_root=cache)
    loaded: list[str | None] = []
    real_load = subject.load
    subject.load = lambda variant, device: loaded.append(variant) or real_load(variant, device)
    before = generations(cache)
    data = evaluate_quality(subject, num_prompts=1, cache_root=cache, **FAST)
    assert loaded == ["mxfp8"]  # the bf16 pipeline was never loaded
    assert all(generations(cache)[k] == t for k, t in before.items())
    assert data["prompts"][0]["seconds_bf16"] > 0 and 0 < data["forward"]["rel_l2"] < 0.05


def test_fp8_and_mxfp8_are_closer_to_bf16_than_nvfp4(
    converted: dict[str, Path], tmp_path: Path, cache: Path
) -> None:
    """Files-only metrics (weight SQNR, one transformer forward) of one source in 3 formats."""
    scores = {}
    for fmt, out in converted.items():
        subject = subject_for(out, cache_root=cache)
        data = evaluate_quality(subject, generate=False, cache_root=cache, results=tmp_path / fmt,
                                **FAST)  # fmt: skip
        assert data["prompts"] == [] and "picture" not in data
        scores[fmt] = (
            data["weights"]["mean_db"],
            data["weights"]["min_db"],
            data["forward"]["rel_l2"],
        )
    for close in ("fp8", "mxfp8"):
        assert scores[close][0] > scores["nvfp4"][0] + 6  # dB: about 1 bit per 6 dB
        assert scores[close][1] > scores["nvfp4"][1]
        assert scores[close][2] < scores["nvfp4"][2]


def test_weight_sqnr_equals_a_direct_computation(
    converted: dict[str, Path], tiny_flux: Path, cache: Path, tmp_path: Path
) -> None:
    """Per-layer SQNR streamed from the files == 10·log10(Σw²/Σ(w−ŵ)²) computed here from the
    models diffusers loads (ŵ: the loaded NVFP4Tensor dequantized). The report rounds to 4
    decimals; it comes from the cache when the test above ran first."""
    from diffusers import FluxTransformer2DModel

    from qconvert.loaders import load_transformer

    subject = subject_for(converted["nvfp4"], cache_root=cache)
    data = evaluate_quality(subject, generate=False, cache_root=cache, results=tmp_path, **FAST)
    rows = {r["layer"]: r for r in data["weights"]["per_layer"]}
    ref = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer")
    quantized = dict(load_transformer(converted["nvfp4"], device="cpu").named_modules())
    expected = {}
    for name, module in ref.named_modules():
        weight = getattr(quantized.get(name), "weight", None)
        if type(weight).__name__ == "NVFP4Tensor":
            w = module.weight.detach().double()
            err = w - weight.dequantize(torch.float32).double()
            expected[name] = 10 * math.log10(float((w**2).sum()) / float((err**2).sum()))
    assert len(expected) == 20 and set(rows) == set(expected)
    for name, value in expected.items():
        assert rows[name]["sqnr_db"] == pytest.approx(value, abs=1e-4)
        assert rows[name]["format"] == "nvfp4"


@pytest.fixture(scope="module")
def tiny_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Qwen-Image and LTX-2 converted from their tiny builds (the manifest says "tiny": the
    reference is rebuilt from the seed)."""
    root = tmp_path_factory.mktemp("tiny-out")
    return {
        family: convert(root / family, family=family, fmt="fp8", progress=False).output
        for family in ("qwenimage", "ltx2")
    }


@pytest.mark.parametrize("family", ["qwenimage", "ltx2"])
def test_tiny_qwenimage_and_ltx2_end_to_end(
    family: str, tiny_outputs: dict[str, Path], cache: Path, tmp_path: Path
) -> None:
    """With LPIPS on (random AlexNet weights: proves the LPIPS code path runs on these outputs,
    not what its values mean); LTX-2 adds frames (per-frame metrics) and audio."""
    out = Path(shutil.copytree(tiny_outputs[family], tmp_path / family))
    subject = subject_for(out, cache_root=cache)
    assert subject.ref.description == "qconvert's tiny build, seed 0"
    # the tiny builds' own 2 steps: both schedulers give NaN latents for a single step
    data = evaluate_quality(subject, num_prompts=1, lpips="alex", progress=False,
                            lpips_backbone=random_backbone(), cache_root=cache)  # fmt: skip
    row = data["prompts"][0]
    assert row["non_finite_pixels"] == 0 and data["notes"] == [report.CPU_NOTE]
    assert data["lpips"]["available"] and row["lpips"] > 0 and 0 < row["ssim"] < 1
    assert data["metrics"]["lpips"] == row["lpips"]
    assert ("audio_lsd_db" in row) == (family == "ltx2")
    if family == "ltx2":
        assert row["audio_lsd_db"] > 0 and data["settings"]["call"]["num_frames"] == 9
    assert (out / "quality.png").is_file()
    card = (out / "README.md").read_text()
    assert "## Quality" in card and "LPIPS (alex) vs bf16" in card and "(quality.png)" in card


def test_identical_outputs_have_the_psnr_sentinel() -> None:
    """bf16 against itself: PSNR is infinite, written as null + identical: true (valid JSON),
    shown as ∞ in the card."""
    from qconvert.evaluate.report import dumps

    torch.manual_seed(0)
    sample = Sample(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    row = metrics.compare(sample, sample, None)
    assert row["psnr_db"] is None and row["identical"] is True and row["ssim"] == pytest.approx(1)
    assert math.isinf(metrics.pooled_psnr([row]))
    data = {"metrics": {"psnr_db": None, "identical": True, "ssim": 1.0}, "prompts": [row],
            "lpips": {"available": False, "why": "off"}, "forward": {"rel_l2": 0.0},
            "weights": {"layers": 0}, "seconds_per_prompt": {}}  # fmt: skip
    psnr_row = next(r for r in card_rows(data) if r["metric"].startswith("PSNR"))
    assert psnr_row["value"] == "∞ (identical)"
    assert "Infinity" not in dumps({"x": math.inf}) and json.loads(dumps({"x": math.inf})) == {
        "x": None
    }
    noisy = Sample(sample.frames ^ 1)
    assert 40 < metrics.compare(sample, noisy, None)["psnr_db"] < 60


def test_audio_and_video_metrics() -> None:
    torch.manual_seed(0)
    audio = torch.randn(2, 8000)
    assert metrics.spectral_distance_db(audio, audio) == 0
    assert metrics.spectral_distance_db(audio, audio + 0.1 * torch.randn(2, 8000)) > 0
    frames = torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8)
    other = frames.clone()
    other[4] = 255 - other[4]  # one frame of nine differs
    row = metrics.compare(Sample(frames), Sample(other), None)
    one = metrics.compare(Sample(frames[4:5]), Sample(other[4:5]), None)
    assert row["ssim"] == pytest.approx((8 + one["ssim"]) / 9, abs=1e-4)  # per frame, averaged
    assert row["mse"] == pytest.approx(one["mse"] / 9)  # PSNR pools the frames' errors


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_input(converted: dict[str, Path], tmp_path: Path, cache: Path) -> None:
    from qconvert.tiny import qwenimage as tiny_qwenimage

    out = str(converted["fp8"])
    other = tmp_path / "qwen-src"
    tiny_qwenimage.build(other, seed=0)
    changed = Path(shutil.copytree(converted["fp8"], tmp_path / "changed"))
    config = json.loads((changed / "transformer" / "config.json").read_text())
    config["num_layers"] = 2
    (changed / "transformer" / "config.json").write_text(json.dumps(config))
    empty = write(tmp_path / "empty.txt", "# only a comment\n\n")
    bad_json = write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{oops\n')
    no_prompt = write(tmp_path / "p.jsonl", '{"text": "a"}\n')
    cases = {
        (str(tmp_path),): f"{tmp_path}: no qconvert.json; not a qconvert output",
        (out, "--reference", str(other)): "the reference is a QwenImageTransformer2DModel",
        (out, "--reference", str(changed)): "another architecture than",
        (out, "--prompts", str(empty)): "empty.txt: no prompts",
        (out, "--prompts", str(bad_json)): "bad.jsonl:2: not JSON",
        (out, "--prompts", str(no_prompt)): 'p.jsonl:1: expected an object with a non-empty "',
        (out, "--prompts", str(tmp_path / "missing.txt")): "no such prompt file",
        (out, "--prompts", "drawbench"): "HF_HUB_OFFLINE is set and nothing is cached",
        (out, "--height", "100"): "--height 100: FLUX.1 needs a multiple of 16",
        (out, "--frames", "9"): "--frames: FLUX.1 makes images, not videos",
        ("flux", "--real-shape", "--format", "nvfp4"): "--real-shape needs a CUDA GPU",
        ("flux", "--real-shape"): "--real-shape needs --format",
        ("ltx2", "--real-shape", "--format", "fp8"): "only flux has a real-shape",
    }
    for args, message in cases.items():
        result = cli("eval", *args, "--cache-dir", str(cache), "-q")
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], (
            args,
            result.output,
        )
    assert not (converted["fp8"] / "quality.json").exists()
    with pytest.raises(EvalError, match="--num-prompts 0"):
        evaluate_quality(subject_for(converted["fp8"], cache_root=cache), num_prompts=0,
                         cache_root=cache)  # fmt: skip
