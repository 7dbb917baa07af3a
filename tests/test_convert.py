"""tiny FLUX → nvfp4 / mxfp8 → plain diffusers and qconvert.loaders: round trip, bit-exactness
with torchao for every quantized layer, the layout diffusers itself writes, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchao.prototype.mx_formats.inference_workflow as workflow
from diffusers import DiffusionPipeline, FluxTransformer2DModel, TorchAoConfig
from safetensors import safe_open
from torchao.quantization import quant_api, quantize_
from torchao_compare import assert_identical

from qconvert.convert import convert
from qconvert.formats import FORMATS
from qconvert.loaders import load_pipeline, load_transformer, prepare
from qconvert.manifest import MANIFEST, sha256_file
from qconvert.tiny.flux import CALL

FORMAT_NAMES = sorted(FORMATS)
# Relative L2 error of the tiny transformer's output vs bf16, per format (measured 0.0082
# nvfp4, 0.0045 mxfp8, 0.0039 fp8 with torch 2.13 / torchao 0.18; ~3× headroom for seeds).
TOLERANCE = {"nvfp4": 0.03, "mxfp8": 0.015, "fp8": 0.015}
TENSOR_TYPE = {"nvfp4": "NVFP4Tensor", "mxfp8": "MXTensor", "fp8": "Float8Tensor"}
CPU_PATH = {"nvfp4": "weight-only dequantize", "mxfp8": "emulated", "fp8": "weight-only dequantize"}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def transformer_inputs(model: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    return {
        "hidden_states": torch.randn(1, 64, cfg.in_channels, generator=g).bfloat16(),
        "encoder_hidden_states": torch.randn(1, 8, cfg.joint_attention_dim, generator=g).bfloat16(),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g).bfloat16(),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(64, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
    }


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_plain_diffusers_loads_every_layer_bit_exact_with_torchao(
    fmt: str, tiny_flux: Path, converted: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workflow, "is_sm_at_least_100", lambda: True)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    source = FluxTransformer2DModel.from_pretrained(
        tiny_flux, subfolder="transformer", dtype=torch.bfloat16
    )
    ours = FluxTransformer2DModel.from_pretrained(
        converted[fmt], subfolder="transformer", dtype=torch.bfloat16
    )
    manifest = json.loads((converted[fmt] / MANIFEST).read_text())
    decisions = {row["name"]: row["action"] for row in manifest["layers"]}
    ours_modules = dict(ours.named_modules())
    n_quantized = 0
    for name, module in source.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        got = ours_modules[name].weight
        if decisions[name] == "keep":
            assert type(got.data) is torch.Tensor and torch.equal(got, module.weight), name
            continue
        n_quantized += 1
        ref = torch.nn.Linear(module.in_features, module.out_features, dtype=torch.bfloat16)
        ref.weight.data.copy_(module.weight.data)
        quantize_(ref, FORMATS[fmt].config())
        expected = ref.weight
        assert_identical(got, expected, strides=False)  # got went through a file
    assert n_quantized == manifest["summary"]["quantized_layers"] == 20  # single proj_out too
    for key, value in source.state_dict().items():  # everything else: identical bytes
        if (
            key.removesuffix(".weight") not in decisions
            or decisions[key.removesuffix(".weight")] == "keep"
        ):
            assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_round_trip_pipeline_call_and_accuracy(
    fmt: str, tiny_flux: Path, converted: dict[str, Path]
) -> None:
    plain = DiffusionPipeline.from_pretrained(converted[fmt], dtype=torch.bfloat16)
    weight = plain.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == TENSOR_TYPE[fmt]
    chosen = prepare(plain.transformer, torch.device("cpu"))
    assert chosen == {TENSOR_TYPE[fmt]: CPU_PATH[fmt]}
    image = plain(
        "a cat holding a sign", generator=torch.Generator().manual_seed(0), output_type="np", **CALL
    ).images[0]
    assert image.shape == (CALL["height"], CALL["width"], 3) and bool((image == image).all())

    pipe = load_pipeline(converted[fmt], device="cpu")
    image2 = pipe(
        "a cat holding a sign", generator=torch.Generator().manual_seed(0), output_type="np", **CALL
    ).images[0]
    assert (image2 == image).all()

    reference = FluxTransformer2DModel.from_pretrained(
        tiny_flux, subfolder="transformer", dtype=torch.bfloat16
    )
    inputs = transformer_inputs(reference)
    with torch.no_grad():
        want = reference(**inputs).sample.float()
        got = pipe.transformer(**inputs).sample.float()
    err = float((got - want).norm() / want.norm())
    assert torch.isfinite(got).all()
    assert 0 < err < TOLERANCE[fmt], err


def test_load_transformer_and_transformer_only(
    tiny_flux: Path, converted: dict[str, Path], tmp_path: Path
) -> None:
    model = load_transformer(converted["nvfp4"], device="cpu")
    assert type(model.transformer_blocks[0].ff.net[2].weight).__name__ == "NVFP4Tensor"
    assert model.transformer_blocks[0].ff.net[2].weight.act_quant_kwargs is None  # CPU path

    out = convert(
        tmp_path / "t", fmt="mxfp8", source=tiny_flux, transformer_only=True, progress=False
    ).output
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        MANIFEST,
    ]
    plain = FluxTransformer2DModel.from_pretrained(out, dtype=torch.bfloat16)
    assert type(plain.single_transformer_blocks[0].proj_mlp.weight).__name__ == "MXTensor"
    assert type(load_transformer(out, device="cpu").x_embedder.weight.data) is torch.Tensor


def test_same_layout_as_diffusers_own_save(
    tiny_flux: Path, converted: dict[str, Path], tmp_path: Path
) -> None:
    """diffusers quantize-on-load + save_pretrained (MX runs on CPU) writes what we write."""
    ours_cfg = json.loads((converted["mxfp8"] / "transformer" / "config.json").read_text())
    # Our quantization_config, read back by diffusers, makes the same decisions as our plan
    # (the root proj_out kept by exact name, every single block's proj_out quantized).
    model = FluxTransformer2DModel.from_pretrained(
        tiny_flux,
        subfolder="transformer",
        dtype=torch.bfloat16,
        quantization_config=TorchAoConfig.from_dict(ours_cfg["quantization_config"]),
    )
    assert type(model.single_transformer_blocks[0].proj_out.weight).__name__ == "MXTensor"
    assert type(model.proj_out.weight) is torch.nn.Parameter
    model.save_pretrained(tmp_path / "d", safe_serialization=True, max_shard_size="10MB")
    theirs_cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert theirs_cfg["quantization_config"] == ours_cfg["quantization_config"]
    assert {k: v for k, v in theirs_cfg.items() if not k.startswith("_")} == {
        k: v for k, v in ours_cfg.items() if not k.startswith("_")
    }

    def read_all(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors, meta = {}, {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                meta.update(f.metadata())
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        return tensors, meta

    theirs_t, theirs_m = read_all(tmp_path / "d")
    ours_t, ours_m = read_all(converted["mxfp8"] / "transformer")
    assert sorted(theirs_t) == sorted(ours_t)
    for key, value in theirs_t.items():
        assert value.dtype == ours_t[key].dtype and torch.equal(
            value.reshape(-1).view(torch.uint8), ours_t[key].reshape(-1).view(torch.uint8)
        ), key
    assert sorted(json.loads(theirs_m.pop("tensor_names"))) == sorted(
        json.loads(ours_m.pop("tensor_names"))
    )
    assert theirs_m == ours_m
    index = json.loads(
        (
            converted["mxfp8"] / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
        ).read_text()
    )
    assert sorted(index["weight_map"]) == sorted(ours_t)


def test_manifest_records_versions_source_layers_and_files(
    tiny_flux: Path, converted: dict[str, Path]
) -> None:
    root = converted["nvfp4"]
    data = json.loads((root / MANIFEST).read_text())
    assert set(data["versions"]) >= {"qconvert", "torch", "torchao", "diffusers", "safetensors"}
    assert data["source"]["kind"] == "local" and data["source"]["path"] == str(tiny_flux.resolve())
    src_files = {row["path"]: row["sha256"] for row in data["source"]["files"]}
    assert src_files["transformer/diffusion_pytorch_model.safetensors"] == sha256_file(
        tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors"
    )
    assert "vae/diffusion_pytorch_model.safetensors" in src_files
    assert data["format"]["torchao_config"]["_type"] == "NVFP4DynamicActivationNVFP4WeightConfig"
    layers = {row["name"]: row for row in data["layers"]}
    assert len(layers) == 30
    assert layers["proj_out"]["action"] == "keep" and "proj_out" in layers["proj_out"]["reason"]
    assert layers["x_embedder"]["action"] == "keep"
    assert layers["time_text_embed.timestep_embedder.linear_2"]["action"] == "keep"  # 'embed'
    assert layers["transformer_blocks.0.ff.net.2"] == {
        "name": "transformer_blocks.0.ff.net.2",
        "shape": [1024, 4096],
        "action": "nvfp4",
        "reason": "quantized",
    }
    files = {row["path"]: row for row in data["files"]}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {MANIFEST, "README.md"}  # the card lists their hashes
    for rel, row in files.items():
        assert (
            row["sha256"] == sha256_file(root / rel) and row["size"] == (root / rel).stat().st_size
        )
    shards = [f for f in files if f.startswith("transformer/diffusion_pytorch_model-")]
    assert len(shards) >= 4  # --max-shard-size 10 MB over a 47 MiB transformer
    # other components are byte-identical copies
    assert (root / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tiny_flux / "vae" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_same_inputs_give_byte_identical_outputs(
    tiny_flux: Path, converted: dict[str, Path], tmp_path: Path
) -> None:
    again = convert(
        tmp_path / "again", fmt="nvfp4", source=tiny_flux, max_shard_size=10_000_000, progress=False
    ).output
    assert tree_bytes(again) == tree_bytes(converted["nvfp4"])


def test_skip_patterns_and_shape_rule(tiny_flux: Path, tmp_path: Path) -> None:
    out = convert(
        tmp_path / "s",
        fmt="nvfp4",
        source=tiny_flux,
        transformer_only=True,
        skips=("single_transformer_blocks.*", "re:attn\\.to_[qk]$"),
        progress=False,
    ).output
    layers = {r["name"]: r for r in json.loads((out / MANIFEST).read_text())["layers"]}
    assert (
        layers["single_transformer_blocks.0.proj_mlp"]["reason"]
        == "--skip single_transformer_blocks.*"
    )
    assert layers["transformer_blocks.0.attn.to_q"]["reason"] == "--skip re:attn\\.to_[qk]$"
    assert layers["transformer_blocks.0.attn.to_v"]["action"] == "nvfp4"
    config = json.loads((out / "config.json").read_text())
    kept = config["quantization_config"]["modules_to_not_convert"]
    assert "transformer_blocks.0.attn.to_q" in kept and "transformer_blocks.0.attn.to_v" not in kept


def test_shape_rule_keeps_indivisible_layers() -> None:
    from qconvert.convert.plan import decide
    from qconvert.convert.recipes import families

    FLUX = families()["flux"]

    linear = torch.nn.Linear(3072, 1048, device="meta")  # 1048 % 16 != 0
    layer = decide("blocks.0.ff", linear, torch.bfloat16, FLUX, FORMATS["nvfp4"])
    assert layer.action == "keep" and "out_features 1048 not divisible by 16" in layer.reason
    assert decide("blocks.0.ff", linear, torch.bfloat16, FLUX, FORMATS["mxfp8"]).quantized
