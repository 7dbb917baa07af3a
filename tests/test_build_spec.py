"""`qconvert build` specs, offline: expansion into stably named targets, the GitHub Actions
matrix (`--list --json`, sharded with `--only`), the shipped example, fingerprints (what changes
them and what does not), and every kind of bad spec: one line naming the target and the key
(line and column for TOML syntax errors), exit code 2, nothing run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from qconvert.build import load_spec
from qconvert.build.fingerprint import Sources, fingerprint
from qconvert.cli import main

EXAMPLE = Path(__file__).parent.parent / "examples" / "build.toml"
SPEC = """
[defaults]
formats = ["nvfp4", "mxfp8"]
repo = "alice/{name}-{format}"

[[target]]
family = "flux"
tiny = true

[[target]]
family = "qwenimage"
tiny = true
formats = ["nvfp4"]
repo = "bob/qwen-{family}-{format}"
recipe = "qwen.toml"
"""
RECIPE = '[[rule]]\npattern = "re:^transformer_blocks\\\\.0\\\\."\nformat = "keep"\n'


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["build", *args], catch_exceptions=False)


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    (tmp_path / "qwen.toml").write_text(RECIPE)
    path = tmp_path / name
    path.write_text(text)
    return path


def test_list_expands_targets_with_stable_names_and_a_matrix(tmp_path: Path) -> None:
    spec = write(tmp_path, SPEC)
    result = invoke(str(spec), "--list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    names = [t["name"] for t in data["targets"]]
    assert names == ["tiny-flux-nvfp4", "tiny-flux-mxfp8", "tiny-qwenimage-nvfp4"]
    assert [t["repo"] for t in data["targets"]] == [
        "alice/tiny-flux-nvfp4",
        "alice/tiny-flux-mxfp8",
        "bob/qwen-qwenimage-nvfp4",
    ]
    assert data["targets"][2]["recipe"] == str(tmp_path / "qwen.toml")  # relative to the spec
    matrix = data["matrix"]
    assert [row["target"] for row in matrix["include"]] == names
    assert matrix["include"][0] == {
        "target": "tiny-flux-nvfp4",
        "family": "flux",
        "format": "nvfp4",
        "repo": "alice/tiny-flux-nvfp4",
        "source-key": "tiny-flux",
    }
    text = invoke(str(spec), "--list")
    assert text.exit_code == 0
    rows = text.stdout.splitlines()
    assert rows[0].split() == ["target", "family", "format", "source", "repo"]
    assert rows[3].split() == [
        "tiny-qwenimage-nvfp4",
        "qwenimage",
        "nvfp4",
        "tiny",
        "bob/qwen-qwenimage-nvfp4",
    ]
    assert invoke(str(spec), "--list", "--json").stdout == result.stdout  # stable


def test_only_shards_the_matrix(tmp_path: Path) -> None:
    spec = write(tmp_path, SPEC)
    result = invoke(
        str(spec), "--list", "--json", "--only", "tiny-qwenimage-nvfp4", "--only", "tiny-flux-nvfp4"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["matrix"]["include"]
    assert [r["target"] for r in rows] == ["tiny-flux-nvfp4", "tiny-qwenimage-nvfp4"]  # spec order
    bad = invoke(str(spec), "--list", "--only", "tiny-flux-fp8")
    assert bad.exit_code == 2
    assert bad.stderr.strip() == (
        f"Error: --only tiny-flux-fp8: no such target in {spec}; targets: tiny-flux-nvfp4, "
        f"tiny-flux-mxfp8, tiny-qwenimage-nvfp4"
    )


def test_the_shipped_example_lists() -> None:
    result = invoke(str(EXAMPLE), "--list", "--json")
    assert result.exit_code == 0, result.output
    targets = json.loads(result.stdout)["targets"]
    assert [t["name"] for t in targets] == [
        "FLUX.1-dev-nvfp4",
        "FLUX.1-dev-mxfp8",
        "FLUX.1-dev-fp8",
        "Qwen-Image-nvfp4",
        "LTX-2-nvfp4",
        "LTX-2-fp8",
    ]
    assert targets[0]["repo"] == "my-org/FLUX.1-dev-nvfp4" and targets[0]["source_kind"] == "hub"
    assert targets[3]["eval"] == {"prompts": "drawbench", "num-prompts": 32}
    assert targets[4]["bench"] == {"batch": [1, 4], "compile": True}


BAD = [
    # (what to change in SPEC, the one line's expected tail)
    (
        ('family = "qwenimage"', 'family = "qwen"'),
        "target 2: key 'family': unknown family 'qwen'; choose one of flux, ltx2, qwenimage",
    ),
    (
        ('formats = ["nvfp4"]', 'formats = ["nvfp5"]'),
        "target 2 ('tiny-qwenimage'): key 'formats': unknown format 'nvfp5'; choose from "
        "nvfp4, mxfp8, fp8",
    ),
    (
        ('repo = "bob/qwen-{family}-{format}"', 'repo = "bob/qwen {format}"'),
        "target 2 ('tiny-qwenimage-nvfp4'): key 'repo': repo id 'bob/qwen nvfp4' is malformed",
    ),
    (
        ('repo = "bob/qwen-{family}-{format}"', 'repo = "{format}"'),
        "target 2 ('tiny-qwenimage-nvfp4'): key 'repo': repo id 'nvfp4' is malformed (it needs "
        "exactly one '/'",
    ),
    (
        ('repo = "bob/qwen-{family}-{format}"', 'repo = "bob/{model}-{format}"'),
        "target 2 ('tiny-qwenimage-nvfp4'): key 'repo': unknown placeholder {model}",
    ),
    (
        ('family = "qwenimage"\ntiny = true', 'family = "qwenimage"'),
        "target 2: key 'source': missing; give a Hub repo id or a local folder, or tiny = true",
    ),
    (
        ('family = "qwenimage"\ntiny = true', 'family = "qwenimage"\nsource = "./no/such/dir"'),
        "target 2: key 'source': {dir}/no/such/dir: no such folder, and './no/such/dir' is not "
        "a Hub repo id",
    ),
    (
        ('family = "qwenimage"', 'family = "flux"'),
        "target 2 ('tiny-flux-nvfp4'): key 'name': duplicate target name (target 1 has it too)",
    ),
    (
        ('recipe = "qwen.toml"', 'recipe = "nope.toml"'),
        "target 2 ('tiny-qwenimage'): key 'recipe': {dir}/nope.toml: no such recipe file",
    ),
    (
        ('formats = ["nvfp4"]', 'formats = ["nvfp4"]\nskip = ["re:("]'),
        "target 2 ('tiny-qwenimage'): key 'skip': 're:(': invalid regular expression",
    ),
    (
        ('formats = ["nvfp4"]', 'formats = ["nvfp4"]\nmax-shard-size = "five"'),
        "target 2 ('tiny-qwenimage'): key 'max-shard-size': 'five' is not a size; use e.g. 5GB",
    ),
    (
        ('formats = ["nvfp4"]', 'formats = ["nvfp4"]\nmax-shard-size = true'),
        "target 2: key 'max-shard-size': expected a size: bytes, or e.g.",
    ),
    (
        ('formats = ["nvfp4"]', 'formats = ["nvfp4"]\nformat = "nvfp4"'),
        "target 2: key 'format': unknown key; expected one of family,",
    ),
    (
        ('repo = "alice/{name}-{format}"', 'repo = "alice/{name}-{format}"\nname = "x"'),
        "[defaults]: key 'name': 'name' belongs in a [[target]]",
    ),
    (
        ('family = "qwenimage"\ntiny = true', 'family = "qwenimage"\ntiny = true\nrevision = "v1"'),
        "target 2 ('tiny-qwenimage'): key 'revision': only applies to Hub repo ids, not to a tiny "
        "source",
    ),
]


@pytest.mark.parametrize(("change", "expected"), BAD, ids=[b[1].split(":")[1] for b in BAD])
def test_a_bad_spec_is_one_line_naming_target_and_key_exit_2(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    old, new = change
    assert old in SPEC
    spec = write(tmp_path, SPEC.replace(old, new, 1))
    for args in (["--list"], ["--dry-run"], []):  # refused before anything runs
        result = invoke(str(spec), *args, "-o", str(tmp_path / "out"))
        assert result.exit_code == 2, result.output
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"Error: {spec}: " + expected.replace("{dir}", str(tmp_path))), (
            lines[0]
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[defaults]\nformats = ["nvfp4"\n[[target]]\n', "line 3, column 1"),
        ("[[target]]\nfamily = flux\n", "line 2, column 10"),
        ('[[target]]\nfamily = "flux"\nfamily = "x"', "line 3, column 13"),
    ],
)
def test_toml_syntax_errors_give_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    spec = write(tmp_path, text)
    result = invoke(str(spec), "--list")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {spec}: {where}: invalid TOML: "), result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_other_spec_file_errors(tmp_path: Path) -> None:
    assert invoke(str(tmp_path / "none.toml"), "--list").stderr.strip() == (
        f"Error: {tmp_path / 'none.toml'}: no such spec file"
    )
    empty = write(tmp_path, "[defaults]\nformats = []\n")
    assert "no [[target]] tables" in invoke(str(empty), "--list").stderr
    top = write(tmp_path, "[[targets]]\nfamily = 'flux'\n")
    assert "unknown top-level key 'targets'" in invoke(str(top), "--list").stderr


def test_fingerprints(tmp_path: Path, tiny_flux: Path) -> None:
    """Equal inputs, equal digests; the recipe, format and source each change it."""
    src = Path(shutil.copytree(tiny_flux, tmp_path / "src"))
    local = SPEC + '\n[[target]]\nfamily = "flux"\nsource = "src"\nformats = ["fp8"]\n'
    spec = write(tmp_path, local)
    targets = load_spec(spec).targets
    sources = Sources()
    digests = [fingerprint(t, sources.identity(t)).digest for t in targets]
    assert len(set(digests)) == 4
    assert [
        fingerprint(t, sources.identity(t)).inputs["source"].get("family") for t in targets
    ] == ["flux", "flux", "qwenimage", None]
    again = Sources()  # a fresh resolution: the same digests
    assert [fingerprint(t, again.identity(t)).digest for t in targets] == digests
    qwen, here = targets[2], targets[3]
    identity = again.identity(here)
    assert identity["kind"] == "local" and "path" not in identity  # a moved folder is the same
    assert {row["path"] for row in identity["files"]} >= {
        "model_index.json",
        "transformer/config.json",
        "vae/config.json",
    }
    # The recipe file's rules are an input, its comments are not.
    (tmp_path / "qwen.toml").write_text("# a comment\n" + RECIPE)
    assert fingerprint(qwen, Sources().identity(qwen)).digest == digests[2]
    (tmp_path / "qwen.toml").write_text(RECIPE.replace('"keep"', '"mxfp8"'))
    assert fingerprint(qwen, Sources().identity(qwen)).digest != digests[2]
    # A source file's bytes are an input.
    config = src / "vae" / "config.json"
    config.write_text(config.read_text().replace("{", '{"x": 1, ', 1))
    assert fingerprint(here, Sources().identity(here)).digest != digests[3]
