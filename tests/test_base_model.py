"""The base model of any source: `--base-model REPO[@REVISION]` for convert commands and for
`qconvert card`, a folder of the Hub cache recognized from its path, and a `hf download
--local-dir` folder recognized from huggingface_hub's own metadata (the commit; the repo id is
not in it). The manifest records where the base came from; the card carries base_model,
base_model_relation and the base's license.

The `--local-dir` download runs the real `hf` CLI against the loopback Hub (tests/hubserver.py);
that cannot prove the Xet transport."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hubserver import HubServer, client_env

from qconvert.cli import main
from qconvert.convert.base_model import resolve
from qconvert.convert.source import open_local
from qconvert.manifest import MANIFEST

TOKEN = "hf_test_base_model_token"
REPO = "bfl/tiny-flux-transformer"
LICENSED = "---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\n---\n# tiny\n"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
UPLOAD = """
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo(sys.argv[1], exist_ok=True)
api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2], commit_message="tiny")
"""


def meta(root: Path) -> dict[str, Any]:
    text = (root / "README.md").read_text()
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


def source_of(root: Path) -> dict[str, Any]:
    return json.loads((root / MANIFEST).read_text())["source"]


@pytest.fixture(scope="module")
def transformer(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX transformer folder with a README whose front matter has a license."""
    folder = tmp_path_factory.mktemp("t") / "tiny-flux-transformer"
    shutil.copytree(tiny_flux / "transformer", folder)
    (folder / "README.md").write_text(LICENSED)
    return folder


def run(source: Path, out: Path, *extra: str) -> str:
    result = CliRunner().invoke(
        main, ["flux", "--format", "nvfp4", "--source", str(source), "-o", str(out), "-q", *extra]
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_base_model_flag_for_any_folder(transformer: Path, tmp_path: Path) -> None:
    run(transformer, tmp_path / "o", "--base-model", "black-forest-labs/FLUX.1-dev@main")
    assert source_of(tmp_path / "o")["base_model"] == {
        "repo_id": "black-forest-labs/FLUX.1-dev",
        "revision": "main",
        "from": "flag",
    }
    data = meta(tmp_path / "o")
    assert data["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert data["base_model_relation"] == "quantized"
    assert (data["license"], data["license_name"]) == ("other", "flux-1-dev-non-commercial-license")
    text = (tmp_path / "o" / "README.md").read_text()
    assert "# FLUX.1-dev — NVFP4" in text and "as given with `--base-model`" in text


def test_plain_local_folder_records_no_base(converted: dict[str, Path]) -> None:
    """Without the flag a plain folder has no known base: none is made up, and the manifest
    has no base_model key (plain runs write what they always wrote)."""
    assert "base_model" not in source_of(converted["nvfp4"])
    assert "base_model" not in meta(converted["nvfp4"])


def test_bad_base_model_values(transformer: Path, tmp_path: Path) -> None:
    for value, message in [
        ("FLUX.1-dev", "exactly one '/'"),
        ("org/name@", "empty revision"),
        ("org/na me", "malformed"),
        ("org/name@a b", "revision 'a b'"),
    ]:
        args = ["flux", "--format", "nvfp4", "--source", str(transformer), "-o", f"{tmp_path}/x"]
        result = CliRunner().invoke(main, [*args, "--base-model", value])
        assert result.exit_code == 1, result.output
        assert message in result.output and "--base-model" in result.output
        assert not (tmp_path / "x").exists()
    args = ["flux", "--format", "nvfp4", "--tiny", "--base-model", "a/b", "-o", str(tmp_path / "t")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "--tiny build has no base model" in result.output


def test_hub_cache_folder_and_override(transformer: Path, tmp_path: Path) -> None:
    """A snapshot folder of the Hub cache is its base (repo and commit from the path, recorded as
    `hub cache path`); --base-model overrides it."""
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    blobs = snapshot.parents[1] / "blobs"
    blobs.mkdir()
    for file in transformer.iterdir():  # like the cache: symlinks into the repo's blobs
        shutil.copyfile(file, blobs / file.name)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", file.name))
    run(snapshot, tmp_path / "cached")
    assert source_of(tmp_path / "cached")["base_model"] == {
        "repo_id": "black-forest-labs/FLUX.1-dev",
        "commit": COMMIT,
        "from": "hub cache path",
    }
    assert meta(tmp_path / "cached")["base_model"] == "black-forest-labs/FLUX.1-dev"
    card = (tmp_path / "cached" / "README.md").read_text()
    assert "the Hub cache of [black-forest-labs/FLUX.1-dev]" in card

    # The flag overrides what the path says (what convert records, without converting again).
    assert resolve(open_local(snapshot), "alice/flux-finetune@v2") == {
        "repo_id": "alice/flux-finetune",
        "revision": "v2",
        "from": "flag",
    }


def test_card_base_model_on_an_existing_output(converted: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    shutil.copytree(converted["nvfp4"], out)
    files = {
        p: p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, "README.md")
    }
    result = CliRunner().invoke(
        main, ["card", str(out), "--base-model", f"black-forest-labs/FLUX.1-dev@{COMMIT}"]
    )
    assert result.exit_code == 0, result.output
    assert source_of(out)["base_model"] == {
        "repo_id": "black-forest-labs/FLUX.1-dev",
        "revision": COMMIT,
        "commit": COMMIT,
        "from": "flag",
    }
    assert meta(out)["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert all(p.read_bytes() == data for p, data in files.items())  # only manifest and card
    verify = CliRunner().invoke(main, ["inspect", str(out), "--verify"])
    assert verify.exit_code == 0, verify.output
    # Re-rendering (as push does) keeps it: the base lives in the manifest.
    card = (out / "README.md").read_text()
    assert CliRunner().invoke(main, ["card", str(out)]).exit_code == 0
    assert (out / "README.md").read_text() == card
    from qconvert.cards import default_repo_name

    assert default_repo_name(json.loads((out / MANIFEST).read_text())) == "FLUX.1-dev-nvfp4"
    bad = CliRunner().invoke(main, ["card", str(out), "--base-model", "nope"])
    assert bad.exit_code == 1 and "--base-model 'nope'" in bad.output


@pytest.fixture(scope="module")
def downloaded(transformer: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`hf download REPO --local-dir DIR` of the tiny transformer, by the real CLI."""
    with HubServer(tokens={TOKEN: "bfl"}) as hub:
        folder = tmp_path_factory.mktemp("dl") / "tiny"
        with tempfile.TemporaryDirectory() as home:
            env = client_env(hub, Path(home), TOKEN)
            subprocess.run(
                [sys.executable, "-c", UPLOAD, REPO, str(transformer)], env=env, check=True
            )
            hf = [sys.executable, "-c", "from huggingface_hub.cli.hf import main; main()"]
            subprocess.run(
                [*hf, "download", REPO, "--local-dir", str(folder)],
                env=env,
                check=True,
                capture_output=True,
                timeout=120,
            )
        folder.joinpath(".commit").write_text(hub.history(REPO)[0].sha)
        yield folder
        assert not hub.errors, hub.errors


def test_local_dir_download_is_recognized(
    downloaded: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    commit = downloaded.joinpath(".commit").read_text()
    assert (downloaded / ".cache" / "huggingface" / "download" / "config.json.metadata").is_file()
    run(downloaded, tmp_path / "o")
    # The metadata holds the commit, not the repo id: recorded, and the user is asked for it.
    assert source_of(tmp_path / "o")["base_model"] == {
        "repo_id": None,
        "commit": commit,
        "from": "local-dir metadata",
    }
    assert "pass --base-model REPO" in caplog.text and commit[:12] in caplog.text
    assert "base_model" not in meta(tmp_path / "o")
    card = (tmp_path / "o" / "README.md").read_text()
    assert f"`hf download --local-dir` folder, commit `{commit}`" in card

    assert meta(tmp_path / "o")["license"] == "other"  # from the downloaded README
    # --base-model names the repo; the commit still comes from the folder's metadata.
    assert resolve(open_local(downloaded), REPO) == {
        "repo_id": REPO,
        "revision": None,
        "commit": commit,
        "commit_from": "local-dir metadata",
        "from": "flag",
    }


def test_local_dir_file_changed_after_download(
    downloaded: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A weight file modified after the download is no longer that commit's: no commit claimed."""
    copy = tmp_path / "copy"
    shutil.copytree(downloaded, copy)  # copytree keeps mtimes
    config = copy / "config.json"
    assert resolve(open_local(copy), None) == resolve(open_local(downloaded), None)
    later = config.stat().st_mtime + 60
    os.utime(config, (later, later))
    assert resolve(open_local(copy), None) is None
