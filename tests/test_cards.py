"""Model cards: rendered from the manifest only, with the metadata keys the Hub reads, every
section the issue asks for, measurements only when measured, and the hardware matrix taken from
the loader's own table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from qconvert import cards
from qconvert.cards import CardError, default_repo_name, render_card, restricts_use
from qconvert.cli import main
from qconvert.formats import FORMATS
from qconvert.loaders import runtime
from qconvert.manifest import MANIFEST

SECTIONS = ["## What this is", "## Sizes", "## Hardware", "## Usage", "## How it was made"]
# License ids the Hub accepts (a subset of https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = {
    "apache-2.0", "mit", "openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m",
    "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0",
    "bsd-3-clause", "gpl-3.0", "llama3", "gemma", "other",
}  # fmt: skip
FLUX_DEV_CARD = {
    "license": "other",
    "license_name": "flux-1-dev-non-commercial-license",
    "license_link": "LICENSE.md",
    "gated": "auto",
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n"), text[:80]
    header, body = text[4:].split("\n---\n", 1)
    data = yaml.safe_load(header)
    assert isinstance(data, dict) and body.strip()
    return data


def with_manifest(root: Path, manifest: dict[str, Any], **changes: Any) -> Path:
    """A folder holding only a (changed) manifest: all a card needs."""
    root.mkdir(parents=True, exist_ok=True)
    data = json.loads(json.dumps(manifest))
    for key, value in changes.items():
        data[key] = value
    (root / MANIFEST).write_text(json.dumps(data))
    return root


def manifest_of(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def hub_source(manifest: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    return {
        **manifest["source"],
        "kind": "hub",
        "repo_id": "black-forest-labs/FLUX.1-dev",
        "revision": "main",
        "commit": COMMIT,
        "card": card,
    }


def test_hub_metadata_of_a_flux_dev_conversion(converted: dict[str, Path], tmp_path: Path) -> None:
    """The YAML keys and values the Hub uses, for a FLUX.1-dev-like Hub source."""
    manifest = manifest_of(converted["nvfp4"])
    root = with_manifest(tmp_path / "o", manifest, source=hub_source(manifest, FLUX_DEV_CARD))
    text = render_card(root, "alice/FLUX.1-dev-nvfp4")
    meta = front_matter(text)
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "other" and meta["license"] in HUB_LICENSES
    assert meta["license_name"] == "flux-1-dev-non-commercial-license"
    # LICENSE.md is not among this output's files: the link goes to the base repo's, pinned.
    assert meta["license_link"] == (
        f"https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/{COMMIT}/LICENSE.md"
    )
    assert meta["tags"] == ["torchao", "nvfp4", "qconvert"]
    assert "**Restricted use.**" in text and "`flux-1-dev-non-commercial-license`" in text
    assert "gated on the Hub (auto approval)" in text
    assert "# FLUX.1-dev — NVFP4" in text and default_repo_name(manifest_of(root)) == (
        "FLUX.1-dev-nvfp4"
    )
    assert 'from_pretrained("alice/FLUX.1-dev-nvfp4"' in text
    assert f"commit `{COMMIT}`" in text
    card = ModelCard(text)  # huggingface_hub parses it back to the same metadata
    assert card.data.base_model == "black-forest-labs/FLUX.1-dev" and card.data.license == "other"

    # A LICENSE file that travelled with the output is linked in place.
    files = [*manifest["files"], {"path": "LICENSE.md", "size": 5, "sha256": "0" * 64}]
    copied = with_manifest(
        tmp_path / "c", manifest, files=files, source=hub_source(manifest, FLUX_DEV_CARD)
    )
    assert front_matter(render_card(copied))["license_link"] == "LICENSE.md"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_card_of_every_format_has_every_section(
    fmt: str, converted: dict[str, Path], tmp_path: Path
) -> None:
    root = converted[fmt]  # converted from a local folder (the tiny FLUX build, no README)
    manifest = manifest_of(root)
    text = (root / "README.md").read_text()
    assert text == render_card(root)  # convert wrote it; re-rendering reproduces it byte for byte
    meta = front_matter(text)
    assert "base_model" not in meta and "license" not in meta  # neither is known: none is faked
    assert "**License unknown.**" in text and f"# tiny-flux — {fmt.upper()}" in text
    assert meta["tags"] == ["torchao", fmt, "qconvert"]
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"

    tiny = {**manifest["source"], "kind": "tiny", "family": "flux", "seed": 0}
    tiny_text = render_card(with_manifest(tmp_path / "t", manifest, source=tiny))
    tiny_meta = front_matter(tiny_text)
    assert "base_model" not in tiny_meta and tiny_meta["license"] == "apache-2.0"
    assert "**Test artifact.**" in tiny_text
    assert f"# tiny FLUX.1 (test artifact) — {fmt.upper()}" in tiny_text

    positions = [text.index(s) for s in [*SECTIONS, "## Files"]]
    assert positions == sorted(positions)
    assert "## Quality" not in text and "## Speed" not in text  # nothing measured, nothing shown
    assert f"{FORMATS[fmt].bits_per_element} bits per weight element" in text
    s = manifest["summary"]
    assert f"{s['quantized_layers']} of {s['linear_layers']} Linear layers" in text
    assert f"{s['size_ratio']:.3f}×" in text
    for row in manifest["layers"]:
        if row["action"] == "keep":
            assert row["reason"] in text  # every reason a layer was kept is summarized
    versions = manifest["versions"]
    for name in ("torch", "torchao", "diffusers", "transformers"):
        assert f'"{name}=={versions[name].split("+")[0]}"' in text
    assert f"```bash\n{manifest['command']}\n```" in text
    for row in manifest["files"]:
        assert f"| `{row['path']}` |" in text and f"`{row['sha256']}`" in text
    assert f'DiffusionPipeline.from_pretrained("tiny-flux-{fmt}"' in text
    assert f'load_pipeline("tiny-flux-{fmt}")' in text
    kind = FORMATS[fmt].tensor_type()
    rows = [(cls, path) for (tensor, cls), path in runtime.TABLE.items() if tensor == kind]
    as_saved = text.split("Plain diffusers runs the weights as saved on ", 1)[1].split(";")[0]
    assert rows and "native" in {path.name for _, path in rows}
    for cls, path in rows:
        label = runtime.DEVICE_LABELS.get(cls, cls)
        assert f"| {label} | {path.name} | {path.description} | {runtime.WHY[cls]} |" in text
        assert (label.split(" (")[0] in as_saved) == (path.name == "native"), (label, as_saved)


def test_hardware_matrix_is_the_loaders_table(
    converted: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No copy of the table: a new runtime path shows up in the card by itself."""
    fast = runtime.Path("hopper-fused", "fused dequantize + bf16 tensor-core GEMM", lambda w: None)
    table = {**runtime.TABLE, ("NVFP4Tensor", "sm90"): fast}
    monkeypatch.setattr(runtime, "TABLE", table)
    monkeypatch.setitem(runtime.WHY, "sm90", "Hopper: qconvert's fused kernel")
    text = render_card(converted["nvfp4"])
    assert "| sm90 | hopper-fused | fused dequantize + bf16 tensor-core GEMM |" in text
    assert "Hopper: qconvert's fused kernel" in text
    assert "hopper-fused" not in render_card(converted["mxfp8"])


def test_measurements_only_when_measured(converted: dict[str, Path], tmp_path: Path) -> None:
    root = with_manifest(tmp_path / "m", manifest_of(converted["nvfp4"]))
    quality = {
        "setup": "1024x1024, 28 steps, guidance 3.5, 8 prompts x 2 seeds",
        "reference": "bf16 pipeline, same prompts and seeds",
        "device": "NVIDIA B200",
        "rows": [{"metric": "LPIPS (alex) vs bf16", "value": 0.07123, "note": "lower is better"}],
    }
    speed = {
        "setup": "1024x1024, 28 steps, batch 1, torch.compile",
        "command": "python bench.py",
        "rows": [
            {"config": "bf16", "seconds_per_image": 3.1},
            {"config": "nvfp4", "seconds_per_image": 1.9, "peak_gib": 14.2},
        ],
    }
    (root / "quality.json").write_text(json.dumps(quality))
    (root / "speed.json").write_text(json.dumps(speed))
    text = render_card(root)
    assert text.index("## Quality") < text.index("## Speed") < text.index("## Files")
    assert "| metric | value | note |" in text and "| LPIPS (alex) vs bf16 | 0.07123 |" in text
    assert "Device: NVIDIA B200" in text and "Reference: bf16 pipeline" in text
    assert "| config | seconds_per_image | peak_gib |" in text and "| bf16 | 3.1 |  |" in text
    assert "Reproduce: `python bench.py`" in text

    bad = {"quality.json": "{", "speed.json": json.dumps({"setup": "x", "rows": []})}
    for name, content in bad.items():
        (root / name).write_text(content)
        with pytest.raises(CardError, match=name):
            render_card(root)
        result = CliRunner().invoke(main, ["card", str(root)])
        assert result.exit_code == 1
        assert result.output.strip().splitlines()[-1].startswith(f"Error: {root / name}:")
        (root / name).unlink()


def test_card_command_rerenders_from_the_manifest(
    converted: dict[str, Path], tmp_path: Path
) -> None:
    root = Path(shutil.copytree(converted["mxfp8"], tmp_path / "copy"))
    original = (root / "README.md").read_text()
    (root / "README.md").unlink()
    result = CliRunner().invoke(main, ["card", str(root)])
    assert result.exit_code == 0 and result.output.strip() == f"wrote {root / 'README.md'}"
    assert (root / "README.md").read_text() == original
    result = CliRunner().invoke(main, ["card", str(root), "--repo-id", "alice/x"])
    assert result.exit_code == 0
    text = (root / "README.md").read_text()
    assert 'load_pipeline("alice/x")' in text and "this folder, or the Hub repo" not in text
    result = CliRunner().invoke(main, ["card", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "not a qconvert output" in result.output


def test_license_and_base_model_variants(converted: dict[str, Path], tmp_path: Path) -> None:
    manifest = manifest_of(converted["nvfp4"])
    local = {**manifest["source"], "kind": "local", "path": "/data/my-dit"}

    text = render_card(with_manifest(tmp_path / "u", manifest, source=local))
    unknown = front_matter(text)
    assert "license" not in unknown and "base_model" not in unknown
    assert "**License unknown.**" in text and "local `my-dit` folder" in text

    mit_source = {**local, "card": {"license": "mit"}}
    mit = render_card(with_manifest(tmp_path / "m", manifest, source=mit_source))
    assert front_matter(mit)["license"] == "mit" and "\n> " not in mit.split("## What")[0]

    nc = {**local, "card": {"license": "cc-by-nc-4.0"}}
    assert "**Restricted use.**" in render_card(with_manifest(tmp_path / "n", manifest, source=nc))

    custom = {**local, "card": {"license": "other", "license_name": "acme-license"}}
    text = render_card(with_manifest(tmp_path / "o", manifest, source=custom))
    assert "**Custom license.**" in text and "`acme-license`" in text

    # A folder of the Hub cache names its repo and commit: the base model is known.
    cache = f"/h/.cache/huggingface/hub/models--black-forest-labs--FLUX.1-dev/snapshots/{COMMIT}"
    cached = with_manifest(tmp_path / "h", manifest, source={**local, "path": cache})
    meta = front_matter(render_card(cached))
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev"

    assert restricts_use("other", "flux-1-dev-non-commercial-license")
    assert restricts_use("cc-by-nc-sa-4.0", None) and restricts_use(None, "FooNonCommercial v1")
    assert not restricts_use("apache-2.0", None) and not restricts_use("other", "acme-license")
    assert not restricts_use("openrail++", "sync-license")


def test_transformer_only_and_video_cards(converted: dict[str, Path], tmp_path: Path) -> None:
    manifest = manifest_of(converted["mxfp8"])
    recipe = {**manifest["recipe"], "pipeline_tag": "text-to-video", "title": "LTX-2"}
    text = render_card(
        with_manifest(tmp_path / "v", manifest, transformer_only=True, recipe=recipe), "o/ltx"
    )
    assert front_matter(text)["pipeline_tag"] == "text-to-video"
    assert 'FluxTransformer2DModel.from_pretrained("o/ltx"' in text
    assert 'load_transformer("o/ltx")' in text and "DiffusionPipeline" not in text
    assert "every other pipeline component" not in text

    bad = with_manifest(tmp_path / "b", {"schema": 1, "tool": "qconvert"})
    with pytest.raises(CardError, match="missing or malformed field"):
        render_card(bad)
    assert cards.default_repo_name({**manifest, "formats": ["nvfp4", "mxfp8"]}).endswith(
        "nvfp4-mxfp8"
    )


def test_the_h200_measurements_render(converted: dict[str, Path], tmp_path: Path) -> None:
    """What `qconvert bench` / `qconvert eval` wrote on the H200 (benchmarks/results) passes
    the card's schema and shows its device, versions and the real-shape caveat."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    root = with_manifest(tmp_path / "m", manifest_of(converted["nvfp4"]))
    shutil.copy(results / "bench_flux_h200.json", root / "speed.json")
    shutil.copy(results / "eval_flux_nvfp4_h200.json", root / "quality.json")
    shutil.copy(results / "eval_flux_nvfp4_h200.png", root / "quality.png")
    text = render_card(root)
    assert text.index("## Quality") < text.index("## Speed")
    assert text.count("NVIDIA H200 (compute capability 9.0") == 2
    assert "torch 2.11.0" in text and "random weights" in text
    assert "| fp8 | 1 | 102 | 0.768 | 2.959 | 0.759 | 13.74 | 11.16 | 12.4 |" in text  # as measured
    assert "| PSNR vs bf16 (dB) | 44.57 |" in text
    assert "quality.png" in text  # the side-by-side picture is linked
