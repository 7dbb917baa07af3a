"""The CLI: the main job works, and each kind of bad input gets a one-line error, a non-zero
exit, and no output that looks complete."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from qconvert.cli import main
from qconvert.convert import writer
from qconvert.safetensors_io import read_header, write_file
from qconvert.sizes import parse_size


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_failed_cleanly(result: Result, out: Path, message: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: "), result.output
    assert message in lines[-1], lines[-1]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def source_copy(tiny_flux: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_flux, tmp_path / "src"))


def test_tiny_nvfp4_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "tiny-nvfp4"
    result = run("flux", "--format", "nvfp4", "--tiny", "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (nvfp4; recipe flux): 20/30 Linear layers quantized" in result.output
    assert "DiffusionPipeline.from_pretrained" in result.output
    manifest = json.loads((out / "qconvert.json").read_text())
    assert manifest["source"] == {**manifest["source"], "kind": "tiny", "family": "flux", "seed": 0}
    args = ["flux", "--format", "nvfp4", "--tiny", "-o", str(out), "-q"]
    assert manifest["command"] == shlex.join(["qconvert", *args])  # as given, not sys.argv
    shown = run("inspect", str(out), "--verify")
    assert shown.exit_code == 0, shown.output
    assert "transformer_blocks.N.attn.to_q" in shown.output
    assert "proj_out" in shown.output and "verified" in shown.output


def test_help_has_examples() -> None:
    for args in ([], ["flux"], ["inspect"]):
        result = run(*args, "--help")
        assert result.exit_code == 0 and "Example" in result.output


def test_missing_path(tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = run("flux", "--format", "nvfp4", "--source", str(tmp_path / "nope"), "-o", str(out))
    assert_failed_cleanly(result, out, "nope: no such folder")


def test_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o"
    result = run("flux", "--format", "nvfp4", "--source", str(tmp_path / "empty"), "-o", str(out))
    assert_failed_cleanly(result, out, "not a diffusers pipeline")


def test_pipeline_without_transformer(source_copy: Path, tmp_path: Path) -> None:
    index = json.loads((source_copy / "model_index.json").read_text())
    del index["transformer"]
    (source_copy / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "o"
    result = run("flux", "--format", "mxfp8", "--source", str(source_copy), "-o", str(out))
    assert_failed_cleanly(result, out, "has no transformer/ component")


def test_truncated_safetensors(source_copy: Path, tmp_path: Path) -> None:
    shard = source_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "o"
    result = run("flux", "--format", "nvfp4", "--source", str(source_copy), "-o", str(out))
    assert_failed_cleanly(result, out, "truncated or corrupt file")


def test_corrupt_header(source_copy: Path, tmp_path: Path) -> None:
    shard = source_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(data))
    out = tmp_path / "o"
    result = run("flux", "--format", "nvfp4", "--source", str(source_copy), "-o", str(out))
    assert_failed_cleanly(result, out, "corrupt safetensors header")


def test_unknown_format(tmp_path: Path) -> None:
    result = run("flux", "--format", "int3", "--tiny", "-o", str(tmp_path / "o"))
    assert result.exit_code == 2 and "'int3' is not one of" in result.output
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("flux", "--format", "nvfp4", "--tiny", "-o", str(out))
    assert result.exit_code != 0 and "already exists; pass --overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a previous qconvert output, never a folder that is not ours.
    result = run("flux", "--format", "mxfp8", "--tiny", "-o", str(out), "--overwrite", "-q")
    assert result.exit_code != 0 and "not a qconvert output" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    assert run("flux", "--format", "nvfp4", "--tiny", "-o", str(out), "-q").exit_code == 0
    result = run("flux", "--format", "mxfp8", "--tiny", "-o", str(out), "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "qconvert.json").read_text())["format"]["name"] == "mxfp8"


def test_interruption_keeps_finished_shards_for_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = writer._quantize

    def interrupted(*args: object) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "_quantize", interrupted)
    out = tmp_path / "o"
    args = ("flux", "--format", "nvfp4", "--tiny", "-o", str(out), "--max-shard-size", "5MB", "-q")
    result = run(*args)
    assert result.exit_code != 0 and not out.exists()
    work = tmp_path / ".o.qconvert-partial"
    assert "finished shard(s) kept in" in result.output and "--resume" in result.output
    assert work.is_dir() and not (work / "qconvert.json").exists()
    again = run(*args)
    assert again.exit_code != 0 and "re-run with --resume to continue it" in again.output
    monkeypatch.setattr(writer, "_quantize", real)
    resumed = run(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "qconvert.json").is_file() and not work.exists()


def test_nan_weight_names_the_layer(source_copy: Path, tmp_path: Path) -> None:
    shard = source_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    header = read_header(shard)
    from safetensors.torch import load_file

    tensors = {k: v.clone() for k, v in load_file(shard).items()}  # load_file maps the file
    tensors["transformer_blocks.0.ff.net.2.weight"][3, 3] = float("nan")
    write_file(shard, tensors, header.metadata)
    out = tmp_path / "o"
    result = run("flux", "--format", "nvfp4", "--source", str(source_copy), "-o", str(out))
    assert_failed_cleanly(result, out, "transformer_blocks.0.ff.net.2: 1 NaN/Inf value(s)")


def test_wrong_family(source_copy: Path, tmp_path: Path) -> None:
    config_path = source_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "SD3Transformer2DModel"
    config_path.write_text(json.dumps(config))
    index_path = source_copy / "model_index.json"  # consistent, else that is the error
    index = json.loads(index_path.read_text())
    index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    index_path.write_text(json.dumps(index))
    out = tmp_path / "o"
    result = run("flux", "--format", "nvfp4", "--source", str(source_copy), "-o", str(out))
    assert_failed_cleanly(result, out, "class is SD3Transformer2DModel, not FluxTransformer2DModel")


def test_option_errors(tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = run("flux", "--format", "nvfp4", "--tiny", "--source", "x", "-o", str(out))
    assert result.exit_code == 2 and "--tiny and --source exclude each other" in result.output
    result = run("flux", "--format", "nvfp4", "--tiny", "--max-shard-size", "5XB", "-o", str(out))
    assert result.exit_code == 2 and "is not a size" in result.output
    result = run("flux", "--format", "nvfp4", "--tiny", "--skip", "re:(", "-o", str(out))
    assert_failed_cleanly(result, out, "invalid regular expression")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1000") == 1000 and parse_size("1.5MB") == 1_500_000


def test_inspect_errors(converted: dict[str, Path], tmp_path: Path) -> None:
    result = run("inspect", str(tmp_path))
    assert result.exit_code != 0 and "no qconvert.json; not a qconvert output" in result.output
    copy = Path(shutil.copytree(converted["mxfp8"], tmp_path / "copy"))
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")
    result = run("inspect", str(copy), "--verify")
    assert result.exit_code != 0
    assert "scheduler_config.json: differs from qconvert.json" in result.output
