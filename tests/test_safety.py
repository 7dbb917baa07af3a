"""A source, a manifest and a work directory are untrusted input (issue 11): nothing outside a
source is read, nothing outside the output is written, nothing is destroyed, and every malformed
input is one line (a QconvertError), never a traceback. Each test rebuilds one repro of the
issue as a small fixture (tests/safety_fixtures.py); the Hub-side cases are in
tests/test_safety_hub.py, the fuzz tests in tests/test_fuzz.py."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safety_fixtures import (
    INDEX,
    SMALL,
    as_hub_cache,
    opened_files,
    secret_file,
    sparse_pipeline,
    write_raw,
)

from qconvert.cli import main
from qconvert.contain import ContainmentError
from qconvert.convert import OutputError, convert, plan_target, writer
from qconvert.convert.plan import PlanError, Selection
from qconvert.convert.recipes import RecipeError, load_user_recipe
from qconvert.convert.source import SourceError, open_local
from qconvert.errors import ManifestError, QconvertError
from qconvert.formats import get_format
from qconvert.safetensors_io import SafetensorsError, read_header
from qconvert.tiny.synthetic import write_flux_source


def plan(src: Path) -> object:
    return plan_target(str(src), get_format("nvfp4"), Selection())


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and text, text
    return text


def cli(*args: str) -> tuple[int, str]:
    """Exit code and the last line printed (an error is that one line, no traceback)."""
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback, not one line: {result.exception!r}") from result.exception
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    return result.exit_code, lines[-1] if lines else ""


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return sparse_pipeline(tmp_path / "src")


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small FLUX pipeline with random bf16 weights (one single block, 1024 wide: some
    layers quantize) and a vae component, for the tests that convert."""
    path = tmp_path_factory.mktemp("real") / "src"
    write_flux_source(path, num_layers=0, num_single_layers=1)
    (path / "vae").mkdir()
    (path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    edit_json(path / "model_index.json", vae=["diffusers", "AutoencoderKL"])
    return path


def run(src: Path, out: Path, **kw: object) -> Path:
    options = {"fmt": "mxfp8", "progress": False, "command": "test"}
    return convert(out, source=src, **{**options, **kw}).output  # type: ignore[arg-type]


# -- 1-3: a source cannot reach outside itself ------------------------------------------------


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_index_mapping_a_shard_outside_is_refused_unread(
    small: Path, tmp_path: Path, kind: str
) -> None:
    secret = secret_file(tmp_path / "outside")
    index = small / "transformer" / INDEX
    data = json.loads(index.read_text())
    entry = "../../outside/secret.safetensors" if kind == "relative" else str(secret)
    data["weight_map"]["x_embedder.weight"] = entry
    index.write_text(json.dumps(data))
    out = tmp_path / "out"
    with opened_files() as opened, pytest.raises(ContainmentError) as e:
        run(small, out)
    assert f"weight_map entry (tensor 'x_embedder.weight') {entry!r}" in one_line(e.value)
    assert str(secret.resolve()) not in opened
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["outside", "src"]


@pytest.mark.parametrize("key", ["../victim", "../../" + "x" * 3, "vae/../../victim", "/abs"])
def test_model_index_keys_must_be_plain_folder_names(small: Path, tmp_path: Path, key: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "private.txt").write_text("not yours")
    edit_json(small / "model_index.json", **{key: ["diffusers", "AutoencoderKL"]})
    with pytest.raises(ContainmentError, match="is not a plain folder name") as e:
        run(small, tmp_path / "out")
    assert repr(key) in one_line(e.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in victim.iterdir()] == ["private.txt"]


def test_symlinked_component_folder_is_refused(small: Path, tmp_path: Path) -> None:
    outside = tmp_path / "etc"
    secret_file(outside)
    shutil.rmtree(small / "vae")
    (small / "vae").symlink_to(outside)
    with opened_files() as opened, pytest.raises(ContainmentError, match="symbolic link") as e:
        run(small, tmp_path / "out")
    assert "'vae'" in one_line(e.value)
    assert not any(p.startswith(str(outside.resolve())) for p in opened)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["component file", "component subfolder", "license", "shard"])
def test_symlinks_out_of_a_source_are_refused(small: Path, tmp_path: Path, what: str) -> None:
    secret = secret_file(tmp_path / "outside")
    shadow = secret.parent / "shadow"
    if what == "component file":
        (small / "vae" / "config.json").unlink()
        (small / "vae" / "config.json").symlink_to(shadow)
    elif what == "component subfolder":
        (small / "vae" / "extra").symlink_to(secret.parent)
    elif what == "license":
        (small / "LICENSE").symlink_to(shadow)
    else:
        shard = next((small / "transformer").glob("*00001-of*.safetensors"))
        shutil.copyfile(shard, secret.parent / "stolen.safetensors")
        shard.unlink()
        shard.symlink_to(secret.parent / "stolen.safetensors")
    with opened_files() as opened, pytest.raises(ContainmentError, match="symbolic link"):
        run(small, tmp_path / "out")
    assert str(shadow.resolve()) not in opened and str(secret.resolve()) not in opened
    assert not (tmp_path / "out").exists()


def test_hub_cache_snapshot_links_are_followed_and_others_are_not(
    real: Path, tmp_path: Path
) -> None:
    src = tmp_path / "plain"
    shutil.copytree(real, src)
    snapshot = as_hub_cache(src, tmp_path / "hub")
    out = run(snapshot, tmp_path / "out")
    assert (out / "vae" / "config.json").read_text() == (real / "vae" / "config.json").read_text()
    # A link from the snapshot to another repo's blobs is not the cache's own kind.
    other = as_hub_cache(sparse_pipeline(tmp_path / "other"), tmp_path / "hub", "evil/repo")
    target = (other / "vae" / "config.json").resolve()
    (snapshot / "vae" / "config.json").unlink()
    (snapshot / "vae" / "config.json").symlink_to(target)
    with pytest.raises(ContainmentError, match=r"'vae/config.json' is a symbolic link"):
        run(snapshot, tmp_path / "out2")


# -- 8: safetensors headers are checked as the safetensors library checks them ----------------


def _entry(dtype: str, shape: list[object], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


HEADERS = {
    "overlapping offsets": (
        {"to_q": _entry("BF16", [4, 4], 0, 32), "to_k": _entry("BF16", [4, 4], 0, 32)},
        32,
        "overlaps the tensor before it",
    ),
    "a gap": ({"a": _entry("BF16", [4], 8, 16)}, 16, "leaves a gap"),
    "float shape": ({"a": _entry("BF16", [2.0, 2], 0, 8)}, 8, "not a list of integers"),
    "negative shape": ({"a": _entry("BF16", [-2, -2], 0, 8)}, 8, "not a list of integers"),
    "bool shape": ({"a": _entry("BF16", [True], 0, 2)}, 2, "not a list of integers"),
    "negative offsets": ({"a": _entry("U8", [0], -4, -4)}, 0, "are not [begin, end]"),
    "unknown dtype": ({"a": _entry("Q4", [4], 0, 4)}, 4, "unknown dtype 'Q4'"),
    "wrong span": ({"a": _entry("F32", [4], 0, 8)}, 8, "needs 16 bytes but data_offsets span 8"),
    "outside the file": ({"a": _entry("U8", [64], 0, 64)}, 8, "lies outside the file"),
    "bytes after the data": ({"a": _entry("U8", [4], 0, 4)}, 8, "4 bytes after the last tensor"),
    "metadata a list": ({"__metadata__": ["x"]}, 0, "__metadata__ must be an object of strings"),
    "metadata not strings": ({"__metadata__": {"a": 1}}, 0, "__metadata__ must be an object"),
    "entry not an object": ({"a": [1, 2]}, 0, "header entry is not an object"),
    "not an object": ([1, 2], 0, "does not start with '{'"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_bad_safetensors_headers_are_one_line(tmp_path: Path, case: str) -> None:
    header, size, message = HEADERS[case]
    path = tmp_path / "x.safetensors"
    write_raw(path, header, size)
    with pytest.raises(SafetensorsError) as e:
        read_header(path)
    assert message in one_line(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{" + b"[" * 100_000, "corrupt safetensors header"),  # RecursionError in json
        (b"  {}", "does not start with '{'"),
        (b'{"a": 1e999999}', "header entry is not an object"),
        (b"\xff\xfe{}", "does not start with '{'"),
        (b'{"a": {"dtype": "U8", "shape": [9' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}',
         "corrupt safetensors header"),  # an integer too long to convert
    ],
)
def test_unparseable_headers_are_one_line(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "x.safetensors"
    write_raw(path, None, 0, raw=raw)
    with pytest.raises(SafetensorsError) as e:
        read_header(path)
    assert message in one_line(e.value)


def test_overlapping_tensors_in_a_source_are_refused(small: Path) -> None:
    shard = next((small / "transformer").glob("*00002-of*.safetensors"))  # the weights
    raw = shard.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    names = sorted(k for k in header if k != "__metadata__" and header[k]["shape"] == [64, 64])
    assert len(names) >= 2
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]  # to_k = to_q's bytes
    write_raw(shard, header, len(raw) - 8 - length)
    with pytest.raises(SafetensorsError, match=r"overlaps the tensor before it|leaves a gap"):
        open_local(small)


# -- 6: every tensor's shape and dtype is checked against the model config.json builds ---------


def test_wrong_num_attention_heads_names_tensor_file_and_shapes(small: Path) -> None:
    edit_json(small / "transformer" / "config.json", num_attention_heads=4)
    with pytest.raises(PlanError) as e:
        plan(small)
    text = one_line(e.value)
    assert ".safetensors: tensor '" in text and "expects [" in text and "has shape [" in text


def test_one_wrong_shape_weight_is_named(tmp_path: Path) -> None:
    name = "single_transformer_blocks.0.proj_out.weight"
    src = sparse_pipeline(tmp_path / "src", shapes={name: (64, 319)})
    with pytest.raises(PlanError) as e:
        plan(src)
    text = one_line(e.value)
    assert f"tensor {name!r} has shape [64, 319]" in text and "expects [64, 320]" in text


def test_integer_weights_are_refused(tmp_path: Path) -> None:
    src = sparse_pipeline(tmp_path / "src")
    shard = next((src / "transformer").glob("*00001-of*.safetensors"))
    raw = shard.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    name = next(k for k in sorted(header) if k.endswith(".weight"))
    header[name]["dtype"] = "I16"
    write_raw(shard, header, len(raw) - 8 - length)
    with pytest.raises(PlanError, match=f"tensor {name!r} is torch.int16, but .* expects a float"):
        plan(src)


def test_a_huge_layer_count_does_not_hang_planning(small: Path) -> None:
    edit_json(small / "transformer" / "config.json", num_layers=10**7)
    start = time.monotonic()
    with pytest.raises(PlanError, match=r"num_layers = 10000000 cannot match weights that hold"):
        plan(small)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("name", ["utils", "FluxPipeline", "AutoModel", "__class__", "a.b", ""])
def test_class_names_that_are_not_models(small: Path, name: str) -> None:
    edit_json(small / "transformer" / "config.json", _class_name=name)
    edit_json(small / "model_index.json", transformer=["diffusers", name])
    with pytest.raises(QconvertError) as e:
        plan(small)
    assert "_class_name" in one_line(e.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("num_layers", "19", "num_layers = \"19\" is a str"),
     ("guidance_embeds", "yes", "guidance_embeds = \"yes\" is a str, but FluxTransformer2DModel"),
     ("axes_dims_rope", "16,56,56", "axes_dims_rope = \"16,56,56\" is a str"),
     ("attention_head_dim", 1.5, "attention_head_dim = 1.5 is a float"),
     ("num_attention_heads", -1, "cannot be built from it (RuntimeError")],
)
def test_wrongly_typed_config_values_name_the_key(
    small: Path, key: str, value: object, message: str
) -> None:
    edit_json(small / "transformer" / "config.json", **{key: value})
    with pytest.raises(PlanError) as e:
        plan(small)
    assert message in one_line(e.value)


def test_model_index_transformer_class_must_match_config(small: Path) -> None:
    edit_json(small / "model_index.json", transformer=["diffusers", "QwenImageTransformer2DModel"])
    with pytest.raises(SourceError, match=r"listed as QwenImageTransformer2DModel, but .* builds"):
        open_local(small)


# -- 4, 7: one writer per output, and --overwrite replaces only our own outputs ---------------


def test_a_second_run_into_the_same_output_is_refused(real: Path, tmp_path: Path) -> None:
    """flock locks conflict between open file descriptions, so a lock held here stands for
    another process's (the pid in the message is then this one's)."""
    from qconvert.convert import workdir

    out = tmp_path / "out"
    with workdir.locked(out):
        code, line = cli("flux", "--format", "mxfp8", "--source", str(real), "-o", str(out), "-q")
        assert code == 1 and line.startswith("Error: ")
        assert f"another qconvert (pid {os.getpid()}) is writing this output" in line
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock file went with it
    run(real, out)  # and the output is free again
    # A lock file planted as a link is never followed (nor written through).
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / ".other.qconvert-lock").symlink_to(victim)
    with pytest.raises(OutputError, match="cannot create the output's lock file"):
        run(real, tmp_path / "other")
    assert victim.read_text() == "keep" and not (tmp_path / "other").exists()


def test_overwrite_refuses_the_source_and_folders_that_are_not_ours(
    real: Path, tmp_path: Path
) -> None:
    src = tmp_path / "pipe" / "src"
    shutil.copytree(real, src)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for target, message in (
        (src, r"is \(or contains\) the source"),
        (src.parent, r"is \(or contains\) the source"),
        (src / "transformer", "lies inside the source"),
        (src / "new-output", "lies inside the source"),
    ):
        with pytest.raises(OutputError, match=message):
            run(src, target, overwrite=True)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(OutputError, match=r"not a qconvert output .* --overwrite only replaces"):
        run(src, other, overwrite=True)
    assert (other / "cat.jpg").read_bytes() == b"meow"
    (tmp_path / "empty").mkdir()
    first = run(src, tmp_path / "empty", overwrite=True)  # an empty folder destroys nothing
    assert run(src, first, overwrite=True) == first  # and our own output is replaced


def test_a_failed_run_removes_the_empty_folders_it_created(small: Path, tmp_path: Path) -> None:
    edit_json(small / "transformer" / "config.json", num_attention_heads=4)
    with pytest.raises(PlanError):
        run(small, tmp_path / "a" / "b" / "c" / "out")
    assert not (tmp_path / "a").exists()


# -- 9: the free-space check counts everything the run writes ----------------------------------


def test_free_space_counts_the_copied_components(
    real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    shutil.copytree(real, src)
    big = 64 * 2**20
    with (src / "vae" / "diffusion_pytorch_model.safetensors").open("wb") as f:
        f.truncate(big)  # a T5-XXL stand-in: sparse, costs nothing here
    transformer = int(plan_target(str(src), get_format("mxfp8"), Selection()).output_bytes)
    usage = shutil.disk_usage(tmp_path)
    free = transformer + big // 2  # enough for the transformer alone
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type(usage)(usage.total, 0, free))
    with pytest.raises(OutputError, match="not enough disk space"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- resume: no unknown files carried, no stale shards, progress.json checked ------------------


def interrupt_when_hashed(
    monkeypatch: pytest.MonkeyPatch, work: Path, n: int, source: Path
) -> None:
    """Ctrl-C at the n-th quantized tensor, once a shard is done and the source's sha256 has
    been recorded (the hashing runs beside the conversion)."""
    calls = []
    real_quantize = writer._quantize

    def recorded() -> bool:
        try:
            data = json.loads((work / "progress.json").read_text())
        except (OSError, ValueError):
            return False
        shards = len(list((source / "transformer").glob("*.safetensors")))
        return bool(data.get("done")) and len(data.get("sources", {})) == shards

    def quantize(*args: object) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == n:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not recorded():
                time.sleep(0.02)
            raise KeyboardInterrupt
        return real_quantize(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "_quantize", quantize)


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("deep") / "src"
    write_flux_source(path, num_layers=0, num_single_layers=2, shard_bytes=20 * 10**6)
    return path


SHARD = 8 * 10**6


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_resume_does_not_trust_size_and_mtime(
    deep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    shutil.copytree(deep, src, copy_function=shutil.copy2)
    out, work = tmp_path / "out", tmp_path / ".out.qconvert-partial"
    interrupt_when_hashed(monkeypatch, work, 25, src)
    with pytest.raises(QconvertError, match=r"interrupted; .* kept"):
        run(src, out, max_shard_size=SHARD)
    monkeypatch.undo()
    # An edit that keeps the size and restores the mtime: only the sha256 can tell.
    shard = sorted((src / "transformer").glob("*.safetensors"))[0]
    st = shard.stat()
    with shard.open("r+b") as f:
        f.seek(st.st_size - 2)
        f.write(b"\x11\x22")
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(SourceError, match="changed since the interrupted run") as e:
        run(src, out, max_shard_size=SHARD, resume=True)
    assert "re-run with --resume" in one_line(e.value) and not out.exists()
    run(src, out, max_shard_size=SHARD, resume=True)
    assert tree(out) == tree(run(src, tmp_path / "fresh", max_shard_size=SHARD))


def test_resume_carries_no_unknown_files_and_checks_progress(
    deep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, work = tmp_path / "out", tmp_path / ".out.qconvert-partial"
    interrupt_when_hashed(monkeypatch, work, 25, deep)
    with pytest.raises(QconvertError, match=r"interrupted; .* kept"):
        run(deep, out, max_shard_size=SHARD)
    monkeypatch.undo()
    (work / "planted.txt").write_text("not ours")
    (work / "transformer" / "evil.safetensors").write_bytes(b"x")
    (work / "link").symlink_to(tmp_path)
    progress = json.loads((work / "progress.json").read_text())
    progress["done"]["../../outside.safetensors"] = "0" * 64  # never read, never kept
    (work / "progress.json").write_text(json.dumps(progress))
    result = run(deep, out, max_shard_size=SHARD, resume=True)
    files = {row["path"] for row in json.loads((result / "qconvert.json").read_text())["files"]}
    assert not {"planted.txt", "link", "transformer/evil.safetensors"} & files
    assert not (result / "planted.txt").exists() and not (result / "link").exists()
    # A progress.json that is not ours is refused in one line.
    interrupt_when_hashed(monkeypatch, work, 25, deep)
    with pytest.raises(QconvertError, match=r"interrupted; .* kept"):
        run(deep, tmp_path / "out", max_shard_size=SHARD, overwrite=True)
    monkeypatch.undo()
    (work / "progress.json").write_text(json.dumps({"done": {}}))
    with pytest.raises(OutputError, match=r"progress.json: not a qconvert progress file \(no fin"):
        run(deep, out, max_shard_size=SHARD, resume=True, overwrite=True)


# -- float32 sources: kept tensors are stored as the summary and the card say -----------------


def test_float32_source_keeps_its_kept_tensors_in_bf16(real: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = tmp_path / "f32"
    shutil.copytree(real, src)
    for shard in (src / "transformer").glob("*.safetensors"):
        tensors = {k: v.float() for k, v in load_file(shard).items()}
        save_file(tensors, shard, {"format": "pt"})
    out = run(src, tmp_path / "out")
    reference = run(real, tmp_path / "bf16")
    data = json.loads((out / "qconvert.json").read_text())
    dtypes = set()
    for shard in (out / "transformer").glob("*.safetensors"):
        dtypes |= {t.dtype for t in read_header(shard).tensors.values()}
    assert torch.float32 not in dtypes and torch.bfloat16 in dtypes
    assert data["summary"] == json.loads((reference / "qconvert.json").read_text())["summary"]
    for shard in (out / "transformer").glob("*.safetensors"):  # the same bytes as from bf16
        assert shard.read_bytes() == (reference / "transformer" / shard.name).read_bytes()


# -- low: one line for every malformed input a user can give -----------------------------------


def test_recipe_files_that_are_not_right(tmp_path: Path) -> None:
    bad = tmp_path / "list.toml"
    bad.write_text('format = ["nvfp4"]\n')
    with pytest.raises(RecipeError, match="format must be one format name"):
        load_user_recipe(bad)
    latin = tmp_path / "latin1.toml"
    latin.write_bytes('# caf\xe9\nformat = "nvfp4"\n'.encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1\.toml: not UTF-8 text"):
        load_user_recipe(latin)
    rule = tmp_path / "rule.toml"
    rule.write_text('[[rule]]\npattern = "x"\nformat = ["keep"]\n')
    with pytest.raises(RecipeError, match="rule 1: `pattern` and `format` must be strings"):
        load_user_recipe(rule)


def test_inspect_on_a_broken_manifest_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "qconvert.json").write_text(json.dumps({"tool": "qconvert", "format": {"name": "x"}}))
    code, line = cli("inspect", str(out))
    assert code == 1 and line.startswith("Error: ") and "missing or malformed field" in line
    (out / "qconvert.json").write_text("{not json")
    code, line = cli("inspect", str(out), "--verify")
    assert code == 1 and "not readable JSON" in line


def test_manifest_files_entries_stay_inside_the_output(tmp_path: Path) -> None:
    from qconvert.manifest import verify

    secret = secret_file(tmp_path / "outside")
    for entry in (str(secret), "../outside/secret.safetensors", "a/../../x", ""):
        with opened_files() as opened, pytest.raises(ManifestError) as e:
            verify(tmp_path / "out", {"files": [{"path": entry, "size": 1, "sha256": "0"}]})
        assert repr(entry) in one_line(e.value) and str(secret.resolve()) not in opened
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(secret)
    with pytest.raises(ManifestError, match="symbolic link"):
        verify(tmp_path / "out", {"files": [{"path": "link", "size": 1, "sha256": "0"}]})


def test_cli_errors_are_one_line(small: Path, tmp_path: Path) -> None:
    edit_json(small / "transformer" / "config.json", _class_name="utils")
    code, line = cli("model", str(small), "--format", "nvfp4", "-o", str(tmp_path / "o"))
    assert code == 1 and line.startswith("Error: ") and "utils" in line


def test_small_fixture_is_valid(small: Path) -> None:
    """The fixture itself opens and plans (its layers are all too small to quantize): every
    refusal above comes from the one change each test makes."""
    assert len(open_local(small).shards) == 2 and SMALL["num_layers"] == 1
    with pytest.raises(PlanError, match="no Linear layer would be quantized"):
        plan(small)
