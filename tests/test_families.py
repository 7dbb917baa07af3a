"""Qwen-Image, LTX-2 and the generic path: recipes as data, plans that match them, tiny
pipelines converted in both formats and run end to end on CPU, mixed recipes through plain
diffusers, and the bad-input rules for recipe files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoModel, DiffusionPipeline

from qconvert.cli import main
from qconvert.convert import (
    families,
    plan_for,
    selection_for,
)
from qconvert.convert.plan import real_config_source
from qconvert.convert.source import open_local
from qconvert.formats import FORMATS
from qconvert.loaders import load_pipeline, prepare
from qconvert.tiny import flux as tiny_flux
from qconvert.tiny import ltx2 as tiny_ltx2
from qconvert.tiny import qwenimage as tiny_qwenimage

TINY = {"flux": tiny_flux, "qwenimage": tiny_qwenimage, "ltx2": tiny_ltx2}
Q = "<format>"
# (regex on the layer name, expected action, text the reason contains); first match applies.
EXPECTED: dict[str, list[tuple[str, str, str]]] = {
    "flux": [
        (r"embed", "keep", "'embed'"),
        (r"^norm_out\.linear$", "keep", "'exact:norm_out.linear'"),
        (r"^proj_out$", "keep", "'exact:proj_out'"),
        (r"^(single_)?transformer_blocks\.\d+\.", Q, "quantized"),  # single blocks' proj_out too
    ],
    "qwenimage": [
        (r"^time_text_embed\.", "keep", "'embed'"),
        (r"^img_in$", "keep", "'img_in'"),
        (r"^txt_in$", "keep", "'txt_in'"),
        (r"\.img_mod\.", "keep", "'img_mod'"),
        (r"\.txt_mod\.", "keep", "'txt_mod'"),
        (r"\.attn\.add_[qkv]_proj$", "keep", "text-stream attention"),
        (r"\.attn\.to_add_out$", "keep", "'to_add_out'"),
        (r"\.txt_mlp\.", "keep", "'txt_mlp'"),
        (r"^norm_out\.linear$", "keep", "'norm_out.linear'"),
        (r"^proj_out$", "keep", "< 1024"),
        (r"\.attn\.to_(q|k|v|out\.0)$|\.img_mlp\.net\.(0\.proj|2)$", Q, "quantized"),
    ],
    "ltx2": [
        (r"^(audio_)?proj_in$", "keep", "'proj_in'"),
        (r"^(audio_)?proj_out$", "keep", "'proj_out'"),
        (r"caption_projection\.", "keep", "'caption_projection'"),
        (r"^(audio_)?time_embed\.", "keep", "'time_embed'"),
        (r"^av_cross_attn_", "keep", "'re:^av_cross_attn_'"),
        (
            r"^transformer_blocks\.\d+\.(.*attn.*\.to_(q|k|v|out\.0)|(audio_)?ff\.net\.(0\.proj|2))$",
            Q,
            "quantized",
        ),
    ],
}


@pytest.fixture(scope="module")
def sources(family_sources: dict[str, Path]) -> dict[str, Path]:
    return family_sources  # conftest: shared with tests/test_lora.py


@pytest.fixture(scope="module")
def outputs(family_outputs: dict[tuple[str, str], Path]) -> dict[tuple[str, str], Path]:
    return family_outputs


def check_decisions(family: str, fmt: str, layers: list[dict[str, object]]) -> None:
    for layer in layers:
        name = str(layer["name"])
        rule = next((r for r in EXPECTED[family] if re.search(r[0], name)), None)
        assert rule is not None, f"{family}: no expectation covers {name}"
        action = fmt if rule[1] == Q else rule[1]
        assert (layer["action"], rule[2] in str(layer["reason"])) == (action, True), layer


@pytest.mark.parametrize("family", sorted(TINY))
def test_plan_matches_the_recipe(family: str, sources: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        main, ["plan", family, "--format", "mxfp8", "--source", str(sources[family]), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{") :])
    assert data["recipe"] == family and data["unmatched_patterns"] == []
    check_decisions(family, "mxfp8", data["layers"])
    text = CliRunner().invoke(main, ["plan", family, "--format", "nvfp4", "--tiny"]).output
    assert f"recipe {family}" in text and "estimated" in text and "params (" in text


@pytest.mark.parametrize(
    ("family", "layers", "quantized", "share", "ratio"),
    [
        # FLUX.1-dev: the seed's exact-name rules keep 10 layers (8 embeddings, norm_out.linear,
        # the final proj_out); all 38 single blocks' proj_out are quantized.
        ("flux", 504, 494, 0.994355, 0.285307),
        ("qwenimage", 846, 360, 0.332581, 0.760957),
        ("ltx2", 1370, 1344, 0.981239, 0.294734),
    ],
)
def test_real_architectures(
    family: str, layers: int, quantized: int, share: float, ratio: float
) -> None:
    """On the real model configs (`qconvert plan FAMILY --format nvfp4 --real-config`), every
    recipe pattern matches a layer (none is stale), each decision follows the recipe, and the
    layer counts, quantized share and nvfp4 size ratio are the ones the README states."""
    recipe = families()[family]
    plan = plan_for(real_config_source(recipe), family, FORMATS["nvfp4"], selection_for())
    assert plan.unmatched == []
    check_decisions(family, "nvfp4", [vars(x) for x in plan.layers])
    s = plan.summary()
    assert (s["linear_layers"], s["quantized_layers"]) == (layers, quantized)
    assert s["quantized_share"] == pytest.approx(share, abs=1e-6)
    assert s["size_ratio"] == pytest.approx(ratio, abs=1e-6)
    if family == "flux":
        assert s["size_ratio"] <= 0.29
        kept = {x.name for x in plan.layers if not x.quantized}
        assert "proj_out" in kept and "single_transformer_blocks.37.proj_out" not in kept


@pytest.mark.parametrize("family", ["qwenimage", "ltx2"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_tiny_family_round_trip(
    family: str, fmt: str, outputs: dict[tuple[str, str], Path]
) -> None:
    out = outputs[(family, fmt)]
    manifest = json.loads((out / "qconvert.json").read_text())
    check_decisions(family, fmt, manifest["layers"])
    plain = DiffusionPipeline.from_pretrained(out, dtype=torch.bfloat16)
    kinds = {
        type(m.weight).__name__
        for m in plain.transformer.modules()
        if isinstance(m, torch.nn.Linear)
    }
    assert kinds == {"Parameter", "NVFP4Tensor" if fmt == "nvfp4" else "MXTensor"}
    pipe = load_pipeline(out, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    torch.set_num_threads(1)
    try:
        call = dict(TINY[family].CALL)
        result = pipe(
            prompt="a cat", output_type="pt", generator=torch.Generator().manual_seed(0), **call
        )
    finally:
        torch.set_num_threads(2)
    if family == "qwenimage":
        assert result.images.shape == (1, 3, call["height"], call["width"])
        assert torch.isfinite(result.images).all()
    else:
        assert result.frames.shape[:2] == (1, call["num_frames"])
        assert torch.isfinite(result.frames).all() and torch.isfinite(result.audio).all()
        assert result.audio.numel() > 0


def test_mixed_recipe_round_trips_through_plain_diffusers(tiny_flux: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "mixed.toml"
    recipe.write_text(
        'format = "nvfp4"\n'
        "[[rule]]\n"
        'pattern = "re:^transformer_blocks\\\\.0\\\\.attn\\\\."\n'
        'format = "mxfp8"\n'
        'reason = "joint attention is sensitive"\n'
        "[[rule]]\n"
        'pattern = "*.ff_context.*"\n'
        'format = "keep"\n'
    )
    result = CliRunner().invoke(
        main,
        [
            "flux",
            "--format",
            "mxfp8",
            "--tiny",
            "--recipe",
            str(recipe),
            "-o",
            str(tmp_path / "o"),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "o"
    manifest = json.loads((out / "qconvert.json").read_text())
    assert manifest["formats"] == ["mxfp8", "nvfp4"]
    assert manifest["recipe"]["recipe_file"]["rules"][0]["format"] == "mxfp8"
    layers = {x["name"]: x for x in manifest["layers"]}
    assert layers["transformer_blocks.0.attn.to_q"]["action"] == "mxfp8"
    assert layers["transformer_blocks.0.attn.to_q"]["reason"].endswith(
        "joint attention is sensitive"
    )
    assert layers["transformer_blocks.0.ff_context.net.2"]["action"] == "keep"
    assert layers["transformer_blocks.0.ff.net.2"]["action"] == "nvfp4"
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_type"]["default"]["_type"] == "FqnToConfig"
    pipe = DiffusionPipeline.from_pretrained(out, dtype=torch.bfloat16)
    blocks = pipe.transformer.transformer_blocks
    assert type(blocks[0].attn.to_q.weight).__name__ == "MXTensor"
    assert type(blocks[0].ff.net[2].weight).__name__ == "NVFP4Tensor"
    assert type(blocks[0].ff_context.net[2].weight.data) is torch.Tensor
    assert prepare(pipe.transformer, torch.device("cpu")) == {
        "MXTensor": "emulated",
        "NVFP4Tensor": "weight-only dequantize",
    }
    image = pipe(
        "a cat", generator=torch.Generator().manual_seed(0), output_type="np", **TINY["flux"].CALL
    ).images[0]
    assert image.shape == (32, 32, 3)


def test_generic_path_on_a_transformer_without_recipe(tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=8,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=4096,
        num_layers=2,
        rope_max_seq_len=32,
    ).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "wan")
    result = CliRunner().invoke(
        main, ["model", str(tmp_path / "wan"), "--format", "nvfp4", "-o", str(tmp_path / "o"), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "recipe generic" in result.output
    layers = {
        x["name"]: x for x in json.loads((tmp_path / "o" / "qconvert.json").read_text())["layers"]
    }
    assert (
        layers["condition_embedder.time_proj"]["reason"]
        == "outside the model's repeated blocks (generic recipe)"
    )
    assert layers["blocks.1.ffn.net.2"]["action"] == "nvfp4"
    assert layers["blocks.0.attn2.to_k"]["action"] == "nvfp4"
    assert layers["proj_out"]["action"] == "keep"
    loaded = AutoModel.from_pretrained(
        str(tmp_path / "o"), dtype=torch.bfloat16
    )  # str: diffusers bug
    assert type(loaded.blocks[0].ffn.net[2].weight).__name__ == "NVFP4Tensor"


def test_model_command_uses_the_family_recipe_when_there_is_one(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    src = open_local(sources["qwenimage"])
    plan = plan_for(src, "auto", FORMATS["nvfp4"], selection_for())
    assert plan.recipe.name == "qwenimage"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_wrong_family_says_which_command_fits(sources: dict[str, Path], tmp_path: Path) -> None:
    code, out = run(
        "flux",
        "--format",
        "nvfp4",
        "--source",
        str(sources["qwenimage"]),
        "-o",
        str(tmp_path / "o"),
    )
    assert code != 0 and "not FluxTransformer2DModel; use `qconvert qwenimage`" in out
    assert not (tmp_path / "o").exists()
    code, out = run("plan", "sd3", "--format", "nvfp4")
    assert code != 0 and "neither a family" in out


def test_recipe_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    cases = {
        '[[rule]]\npattern = "x"\nformat = "int4"\n': "rule 1: unknown format 'int4'",
        '[[rule]]\npattern = "x"\nformat = \n': "invalid TOML: Invalid value (at line 3, column",
        'format = "fp2"\n': "unknown format 'fp2'",
        '[[rule]]\npattern = "re:("\nformat = "keep"\n': "invalid regular expression",
        '[[rule]]\npattern = "x"\n': "needs `pattern` and `format`",
        'colour = "red"\n': "unknown key 'colour'",
    }
    for text, message in cases.items():
        bad.write_text(text)
        code, out = run(
            "flux", "--format", "nvfp4", "--tiny", "--recipe", str(bad), "-o", str(tmp_path / "o")
        )
        assert code != 0 and message in out.strip().splitlines()[-1], (text, out)
        assert not (tmp_path / "o").exists()
    code, out = run(
        "flux",
        "--format",
        "nvfp4",
        "--tiny",
        "--recipe",
        str(tmp_path / "no.toml"),
        "-o",
        str(tmp_path / "o"),
    )
    assert code != 0 and "no such recipe file" in out


def test_pattern_matching_nothing_warns_and_strict_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code, out = run("plan", "flux", "--format", "nvfp4", "--tiny", "--skip", "nonexistent_layer")
    assert code == 0 and "patterns matching no layer: nonexistent_layer" in out
    code, out = run(
        "plan", "flux", "--format", "nvfp4", "--tiny", "--skip", "nonexistent_layer", "--strict"
    )
    assert code != 0 and "'nonexistent_layer' matches no Linear layer (--strict)" in out
    code, out = run(
        "flux", "--format", "nvfp4", "--tiny", "--only", "nothing_here", "-o", str(tmp_path / "o")
    )
    assert code != 0 and "no Linear layer would be quantized" in out
    assert not (tmp_path / "o").exists()


def test_exact_name_patterns(tmp_path: Path) -> None:
    """`exact:NAME` matches the whole module name only, in --skip, --only and recipe files
    (the seed's `name == "proj_out"`); the other forms keep their meaning."""
    from qconvert.convert.recipes import check_pattern, matches

    assert matches("exact:proj_out", "proj_out")
    assert not matches("exact:proj_out", "single_transformer_blocks.0.proj_out")
    assert matches("proj_out", "single_transformer_blocks.0.proj_out")  # substring
    assert matches("*.proj_out", "single_transformer_blocks.0.proj_out")  # glob
    assert not matches("re:^proj_out$", "single_transformer_blocks.0.proj_out")
    assert check_pattern("exact:") and check_pattern("exact:proj_out") is None

    def decisions(*args: str) -> dict[str, dict[str, object]]:
        code, out = run("plan", "flux", "--format", "nvfp4", "--tiny", "--json", *args)
        assert code == 0, out
        return {x["name"]: x for x in json.loads(out[out.index("{") :])["layers"]}

    plain = decisions()
    assert plain["single_transformer_blocks.0.proj_out"]["action"] == "nvfp4"
    skipped = decisions("--skip", "exact:single_transformer_blocks.0.proj_mlp")
    assert skipped["single_transformer_blocks.0.proj_mlp"]["reason"] == (
        "--skip exact:single_transformer_blocks.0.proj_mlp"
    )
    assert sum(x["reason"].startswith("--skip") for x in skipped.values()) == 1
    # A substring would also match single_transformer_blocks.0.attn.to_q; exact: does not.
    to_q = "transformer_blocks.0.attn.to_q"
    only = decisions("--only", f"exact:{to_q}")
    assert [n for n, x in only.items() if x["action"] != "keep"] == [to_q]
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[rule]]\npattern = "exact:{to_q}"\nformat = "mxfp8"\n')
    mixed = decisions("--recipe", str(recipe))
    assert mixed["transformer_blocks.0.attn.to_q"]["action"] == "mxfp8"
    assert mixed["single_transformer_blocks.0.attn.to_q"]["action"] == "nvfp4"
    code, out = run("plan", "flux", "--format", "nvfp4", "--tiny", "--skip", "exact:")
    assert code != 0 and "exact: needs a module name" in out
