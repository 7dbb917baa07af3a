"""load_transformer / load_pipeline from a Hub repo id, against the loopback Hub
(tests/hubserver.py; the real huggingface_hub client and diffusers, HF_HUB_DISABLE_XET=1): the
fast path fetches only what it needs with snapshot_download, then builds exactly what the
compatibility path (QCONVERT_FAST_LOAD=0) builds from the same repo.

A loopback server cannot prove the Xet transport (hf_xet) that real downloads use."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hubserver import HubServer, client_env

from qconvert.manifest import MANIFEST

TOKEN = "hf_test_loader_write_51c3a0"
CHECK = r"""
import json, os, sys
from pathlib import Path
import torch
from huggingface_hub import HfApi
sys.path.insert(0, ARGS["tests"])
from model_compare import same_model
from qconvert.loaders import load_pipeline, load_transformer

api = HfApi()
for repo, folder in ((ARGS["repo"], ARGS["pipeline"]), (ARGS["lone"], ARGS["transformer"])):
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=folder)
cache = Path(os.environ["HF_HOME"]) / "hub"

def cached(repo):
    snaps = cache / ("models--" + repo.replace("/", "--")) / "snapshots"
    return sorted(str(p.relative_to(s)) for s in snaps.iterdir() for p in s.rglob("*")
                  if p.is_file())

fast_t = load_transformer(ARGS["repo"], device="cpu")
only_transformer = cached(ARGS["repo"])
fast_p = load_pipeline(ARGS["repo"], device="cpu")
fast_lone = load_transformer(ARGS["lone"], device="cpu")
os.environ["QCONVERT_FAST_LOAD"] = "0"
old_t = load_transformer(ARGS["repo"], device="cpu")
old_p = load_pipeline(ARGS["repo"], device="cpu")
old_lone = load_transformer(ARGS["lone"], device="cpu")
same_model(fast_t, old_t)
same_model(fast_lone, old_lone)
for name, part in old_p.components.items():
    if isinstance(part, torch.nn.Module):
        same_model(fast_p.components[name], part, name)
RESULT = {"only_transformer": only_transformer, "pipeline_config": dict(fast_p.config) ==
          dict(old_p.config), "name": fast_p.config._name_or_path,
          "load_id": fast_t._diffusers_load_id}
"""


def test_from_a_repo_id(converted: dict[str, Path], tmp_path: Path) -> None:
    lone = tmp_path / "lone"
    shutil.copytree(converted["fp8"] / "transformer", lone)
    shutil.copy(converted["fp8"] / MANIFEST, lone)
    args = {
        "tests": str(Path(__file__).parent), "repo": "alice/flux-nvfp4", "lone": "alice/flux-t",
        "pipeline": str(converted["nvfp4"]), "transformer": str(lone),
    }  # fmt: skip
    with HubServer(tokens={TOKEN: "alice"}) as hub, tempfile.TemporaryDirectory() as home:
        code = f"ARGS = {args!r}\n{CHECK}\nprint('RESULT=' + json.dumps(RESULT))"
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=client_env(hub, Path(home), TOKEN),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert not hub.errors, hub.errors
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compatibility path): QCONVERT_FAST_LOAD=0" in proc.stderr
    assert proc.stderr.count("compatibility path") == 3, proc.stderr[-3000:]  # only the old ones
    result = json.loads(proc.stdout.split("RESULT=", 1)[1])
    got = result["only_transformer"]
    shards = sorted(p.name for p in (converted["nvfp4"] / "transformer").iterdir())
    assert got == sorted([MANIFEST] + [f"transformer/{n}" for n in shards]), got
    assert result["pipeline_config"] and result["name"] == "alice/flux-nvfp4"
    assert result["load_id"] == "alice/flux-nvfp4|transformer|null|null"
