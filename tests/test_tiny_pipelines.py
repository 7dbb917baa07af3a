"""The tiny Qwen-Image and LTX-2 pipelines: real diffusers loads and runs them; builds repeat."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file

from qconvert.tiny import ltx2 as tiny_ltx2
from qconvert.tiny import qwenimage as tiny_qwenimage

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

FAMILIES: dict[str, ModuleType] = {"qwenimage": tiny_qwenimage, "ltx2": tiny_ltx2}
TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
pytestmark = pytest.mark.usefixtures("offline_single_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family built once, with seed 0."""
    dirs = {}
    for name, module in FAMILIES.items():
        dirs[name] = tmp_path_factory.mktemp(name) / "pipeline"
        module.build(dirs[name], seed=0)
    return dirs


def _load(path: Path) -> DiffusionPipeline:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_qwenimage_pipeline_runs(built: dict[str, Path]) -> None:
    pipe = _load(built["qwenimage"])
    assert type(pipe).__name__ == "QwenImagePipeline"
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34

    call = tiny_qwenimage.CALL
    images = pipe(prompt="a cat holding a sign", output_type="pt",
                  generator=torch.Generator().manual_seed(0), **call).images
    assert images.shape == (1, 3, call["height"], call["width"])
    assert torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0


def test_ltx2_pipeline_runs(built: dict[str, Path]) -> None:
    pipe = _load(built["ltx2"])
    assert type(pipe).__name__ == "LTX2Pipeline"
    assert type(pipe.text_encoder).__name__ == "Gemma3ForConditionalGeneration"
    assert type(pipe.vocoder).__name__ == "LTX2Vocoder"
    assert type(pipe.connectors).__name__ == "LTX2TextConnectors"

    call = tiny_ltx2.CALL
    out = pipe(prompt="a robot dancing in the rain", negative_prompt="bad quality, blurry",
               output_type="pt", generator=torch.Generator().manual_seed(0), **call)
    assert out.frames.shape == (1, call["num_frames"], 3, call["height"], call["width"])
    assert torch.isfinite(out.frames).all() and out.frames.std() > 0
    # 9 frames at 24 fps: 9 audio latent frames, 33 (causal) mel frames, ×240 to 24 kHz stereo.
    assert out.audio.shape == (1, 2, 33 * 240)
    assert torch.isfinite(out.audio).all() and out.audio.std() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_blocks_are_quantizable(family: str, built: dict[str, Path]) -> None:
    """Every Linear in the repeated blocks is ≥ 1024 wide both ways and a multiple of 32."""
    import diffusers

    folder = built[family] / "transformer"
    cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    with torch.device("meta"):
        transformer = cls.from_config(cls.load_config(folder))
    linears = [m for n, m in transformer.named_modules()
               if n.startswith("transformer_blocks.") and isinstance(m, torch.nn.Linear)]
    assert len(linears) >= 2 * 10
    for linear in linears:
        for features in (linear.in_features, linear.out_features):
            assert features >= 1024 and features % 32 == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic(family: str, built: dict[str, Path], tmp_path: Path) -> None:
    FAMILIES[family].build(tmp_path, seed=0)
    first = load_file(built[family] / TRANSFORMER_WEIGHTS)
    again = load_file(tmp_path / TRANSFORMER_WEIGHTS)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert {t.dtype for t in first.values()} == {torch.bfloat16}
    other = FAMILIES[family].build_pipeline(seed=1).transformer.state_dict()
    assert not torch.equal(other["proj_out.weight"], first["proj_out.weight"])
