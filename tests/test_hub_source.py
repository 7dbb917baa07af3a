"""Converting straight from a Hub repo id: only the files a conversion needs are downloaded
(through the real huggingface_hub client, against the loopback Hub in tests/hubserver.py), and
the manifest records the repo, the revision asked for and the commit it resolved to.

A loopback server cannot prove the Xet transport, gated-repo access or real token scopes."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubserver import HubServer, client_env

TOKEN = "hf_test_source_token"
REPO = "bfl/tiny-flux"
UPLOAD = """
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo(sys.argv[1], exist_ok=True)
api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2], commit_message="tiny flux")
"""


@pytest.fixture(scope="module")
def hub(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with HubServer(tokens={TOKEN: "bfl"}) as server:
        staged = tmp_path_factory.mktemp("staged")
        import shutil

        shutil.copytree(tiny_flux, staged / "repo")
        # Like FLUX.1-dev's single-file checkpoints at the repo root: never needed by us.
        (staged / "repo" / "flux1-tiny.safetensors").write_bytes(b"\0" * 4096)
        (staged / "repo" / "LICENSE.md").write_text("test license\n")
        with tempfile.TemporaryDirectory() as home:
            subprocess.run(
                [sys.executable, "-c", UPLOAD, REPO, str(staged / "repo")],
                env=client_env(server, Path(home), TOKEN),
                check=True,
                timeout=120,
            )
        yield server
    assert not server.errors, server.errors


def qconvert(hub: HubServer, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as home:
        return subprocess.run(
            [sys.executable, "-m", "qconvert.cli", *args],
            text=True,
            capture_output=True,
            env=client_env(hub, Path(home), TOKEN),
            timeout=300,
            check=False,
        )


def downloaded(hub: HubServer) -> set[str]:
    return {
        r.path.split("/resolve/", 1)[1].split("/", 1)[1]
        for r in hub.requests
        if "/resolve/" in r.path and r.method in ("GET", "HEAD")
    }


def test_convert_from_repo_id_downloads_only_what_it_needs(hub: HubServer, tmp_path: Path) -> None:
    hub.requests.clear()
    out = tmp_path / "o"
    proc = qconvert(
        hub,
        "flux",
        "--format",
        "mxfp8",
        "--source",
        REPO,
        "--revision",
        "main",
        "-o",
        str(out),
        "-q",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = downloaded(hub)
    assert "flux1-tiny.safetensors" not in got and "README.md" not in got
    assert "transformer/diffusion_pytorch_model.safetensors" in got and "LICENSE.md" in got
    source = json.loads((out / "qconvert.json").read_text())["source"]
    assert source["kind"] == "hub" and source["repo_id"] == REPO
    assert source["revision"] == "main" and source["commit"] == hub.history(REPO)[0].sha
    assert (out / "vae" / "config.json").is_file() and (out / "LICENSE.md").is_file()


def test_transformer_only_from_a_pinned_commit(hub: HubServer, tmp_path: Path) -> None:
    sha = hub.history(REPO)[0].sha
    hub.requests.clear()
    proc = qconvert(
        hub,
        "flux",
        "--format",
        "nvfp4",
        "--source",
        REPO,
        "--revision",
        sha,
        "--transformer-only",
        "-o",
        str(tmp_path / "t"),
        "-q",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(
        p.startswith("transformer/") or p in ("model_index.json", "LICENSE.md")
        for p in downloaded(hub)
    )
    assert (tmp_path / "t" / "LICENSE.md").is_file()
    assert json.loads((tmp_path / "t" / "qconvert.json").read_text())["source"]["commit"] == sha


def test_bad_revision_and_missing_repo(hub: HubServer, tmp_path: Path) -> None:
    proc = qconvert(
        hub,
        "flux",
        "--format",
        "nvfp4",
        "--source",
        REPO,
        "--revision",
        "nope",
        "-o",
        str(tmp_path / "x"),
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == f"Error: {REPO}: revision 'nope' not found"
    proc = qconvert(
        hub, "flux", "--format", "nvfp4", "--source", "bfl/missing", "-o", str(tmp_path / "x")
    )
    assert proc.returncode != 0 and "repo not found" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_plan_from_a_repo_id_reads_headers_only(hub: HubServer, tmp_path: Path) -> None:
    hub.requests.clear()
    proc = qconvert(hub, "plan", "flux", "--format", "nvfp4", "--source", REPO, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert remote["source"]["commit"] == hub.history(REPO)[0].sha
    assert remote["summary"]["quantized_layers"] == 20
    # Nothing was downloaded whole: the weights' bytes moved through range reads only.
    moved = [r for r in hub.requests if r.server == "storage" and r.method == "GET"]
    assert moved and all(r.status == 206 for r in moved), moved
