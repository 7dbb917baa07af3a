"""`qconvert push` and `--push`, end to end with the real huggingface_hub client and diffusers
against the loopback Hub in tests/hubserver.py: convert → push → `from_pretrained(repo_id)` in a
fresh cache, a pipeline call, tensors equal to the local output; re-push is a no-op; --create-pr
opens a PR ref; a private repo is invisible without its owner's token; bad input fails in one
line with nothing half-pushed; a token never shows up in output, card or manifest.

Every client runs in a subprocess (``HF_ENDPOINT`` is frozen when huggingface_hub is imported)
with a fresh ``HF_HOME`` and ``HF_HUB_DISABLE_XET=1``; the CLI runs there under click's runner,
several invocations per process, and the client's retry backoff sleeps are skipped (counted).

What a loopback server cannot prove: the Xet transport real pushes and downloads use (hf_xet,
chunk dedup: resuming after a failure rests on it there); real token scopes (fine-grained,
read-only, org roles), gated repos; the Hub's card-schema and license-id checks (only an unclosed
YAML block is refused here; tests/test_cards.py checks the keys); renamed-repo redirects, CDN
behaviour, rate limits and quotas.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hubserver import HubServer, client_env

from qconvert.hub import PushError, check_output, push
from qconvert.manifest import MANIFEST

ALICE = "hf_test_alice_write_d41d8cd9"  # fake tokens, only meaningful to HubServer
BOB = "hf_test_bob_write_8f00b204"
BFL = "hf_test_bfl_write_e9800998"
WRONG = "hf_test_wrong_token_4e1e6b6f"
TOKENS = (ALICE, BOB, BFL, WRONG)

DRIVER = r"""
import json, logging, os, sys, time
from pathlib import Path
import huggingface_hub.utils._http as _http

SLEPT = []

class _NoWait:  # the client's retry backoff (1 s .. 8 s) without the waiting
    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds):
        SLEPT.append(seconds)

_http.time = _NoWait()
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from click.testing import CliRunner
from qconvert.cli import main

results = []
for step in json.loads(sys.argv[1]):
    if "python" in step:
        scope = {"ARGS": step.get("args")}
        exec(step["python"], scope)
        results.append({"value": scope.get("RESULT")})
        continue
    token_file = Path(os.environ["HF_HOME"]) / "token"
    if step.get("stored_token"):
        token_file.write_text(step["stored_token"])
    else:
        token_file.unlink(missing_ok=True)
    sys.argv = ["qconvert", *step["args"]]
    run = CliRunner().invoke(main, step["args"], env=step.get("env", {}))
    error = None if isinstance(run.exception, (SystemExit, type(None))) else repr(run.exception)
    results.append({"code": run.exit_code, "output": run.output, "error": error,
                    "slept": len(SLEPT)})
print("RESULT=" + json.dumps(results))
"""

CHECK_PIPELINE = """
import os, tempfile
from pathlib import Path
import torch
from diffusers import DiffusionPipeline
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
from qconvert.tiny.flux import CALL
from qconvert.loaders import load_pipeline

os.environ.pop("HF_TOKEN", None)  # a public repo: anyone loads it
repo, folder = ARGS["repo"], ARGS["folder"]
cache = tempfile.mkdtemp()

def flat(pipe):
    out = {}
    for name, part in sorted(pipe.components.items()):
        if isinstance(part, torch.nn.Module):
            tensors, _ = flatten_tensor_state_dict(part.state_dict())
            out.update({f"{name}/{key}": t for key, t in tensors.items()})
    return out

remote = DiffusionPipeline.from_pretrained(repo, dtype=torch.bfloat16, cache_dir=cache)
local = DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16)
a, b = flat(remote), flat(local)

def call(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe("a cat holding a sign", generator=g, output_type="np", **CALL).images[0]

image = call(load_pipeline(repo, device="cpu"))  # by repo id, into the (fresh) default cache
RESULT = {
    "same_keys": sorted(a) == sorted(b), "n": len(b),
    "equal": all(torch.equal(a[k], b[k]) for k in b),
    "weight": type(remote.transformer.transformer_blocks[0].attn.to_q.weight).__name__,
    "cached": sorted(str(p.name) for p in Path(cache).rglob("*.safetensors")),
    "finite": bool((image == image).all()), "shape": list(image.shape),
    "same_image": bool((image == call(load_pipeline(folder, device="cpu"))).all()),
}
"""


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with HubServer(tokens={ALICE: "alice", BOB: "bob", BFL: "bfl"}) as server:
        yield server
    assert not server.errors, server.errors


@pytest.fixture(scope="module")
def output(converted: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny nvfp4 output: pushing rewrites its card for the repo id."""
    return Path(shutil.copytree(converted["nvfp4"], tmp_path_factory.mktemp("push") / "out"))


def drive(hub: HubServer, steps: list[dict[str, Any]], token: str | None = ALICE) -> Any:
    """Run CLI invocations and Python steps in one client subprocess; their results."""
    with tempfile.TemporaryDirectory(prefix="hf_home_") as home:
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, json.dumps(steps)],
            env=client_env(hub, Path(home), token),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=home,
        )
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    for secret in TOKENS:  # whatever happened, no token in anything printed or logged
        assert secret not in proc.stdout and secret not in proc.stderr
    return json.loads(lines[-1][len("RESULT=") :])


def last_line(result: dict[str, Any]) -> str:
    assert result["error"] is None, result  # a handled error, not a traceback
    return [ln for ln in result["output"].splitlines() if ln.strip()][-1]


def failed(result: dict[str, Any], *fragments: str) -> str:
    line = last_line(result)
    assert result["code"] == 1 and line.startswith("Error: "), result["output"]
    for fragment in fragments:
        assert fragment in line, line
    return line


def calls(hub: HubServer, method: str, fragment: str) -> list[Any]:
    return [r for r in hub.requests if r.method == method and fragment in r.path]


def no_token_in(*paths: Path) -> None:
    for path in paths:
        text = path.read_text()
        assert not any(secret in text for secret in TOKENS), path


@pytest.fixture(scope="module")
def published(hub: HubServer, output: Path) -> dict[str, Any]:
    """Push the output (default repo id), push it again, then load it back in a fresh cache."""
    repo = "alice/tiny-flux-nvfp4"
    check = {"python": CHECK_PIPELINE, "args": {"repo": repo, "folder": str(output)}}
    first, again, loaded = drive(hub, [{"args": ["push", str(output), "-q"]}] * 2 + [check])
    return {"repo": repo, "first": first, "again": again, "loaded": loaded["value"]}


def test_push_then_from_pretrained_in_a_fresh_cache(
    hub: HubServer, output: Path, published: dict[str, Any]
) -> None:
    repo, first = published["repo"], published["first"]
    head = hub.head(repo)
    assert first["code"] == 0, first["output"]
    assert (
        f"pushed {output} to {hub.endpoint}/{repo} (revision main, commit {head})"
        in (first["output"])
    )
    assert [c.message for c in hub.history(repo)] == [
        "tiny-flux as NVFP4 (qconvert 0.1.0)",
        "initial commit",
    ]
    manifest = json.loads((output / MANIFEST).read_text())
    expected = {row["path"]: row["sha256"] for row in manifest["files"]}
    on_hub = hub.history(repo)[0].files
    assert set(on_hub) == {*expected, MANIFEST, "README.md", ".gitattributes"}
    for path, sha in expected.items():
        assert hashlib.sha256(hub.read_file(repo, path)).hexdigest() == sha, path
    shards = sorted(p for p in expected if p.startswith("transformer/diffusion_pytorch_model-"))
    assert len(shards) > 1 and all(on_hub[p].lfs_sha256 for p in shards)
    card = hub.read_file(repo, "README.md").decode()
    assert card == (output / "README.md").read_text()  # rendered for the repo id, then pushed
    assert f'from_pretrained("{repo}"' in card and f'load_pipeline("{repo}")' in card
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "diffusers"

    loaded = published["loaded"]
    assert loaded["same_keys"] and loaded["equal"] and loaded["n"] > 100
    assert loaded["weight"] == "NVFP4Tensor"
    assert {p.rsplit("/", 1)[1] for p in shards} <= set(loaded["cached"])
    assert loaded["finite"] and loaded["same_image"] and loaded["shape"][2] == 3
    assert calls(hub, "GET", "/download/"), "weights must come from the server's storage"


def test_repush_of_unchanged_files_is_a_no_op(
    hub: HubServer, output: Path, published: dict[str, Any]
) -> None:
    repo, again = published["repo"], published["again"]
    head = hub.head(repo)
    assert again["code"] == 0, again["output"]
    assert (
        f"{hub.endpoint}/{repo} (revision main, commit {head}): already has these files"
        in (again["output"])
    )
    assert len(hub.history(repo)) == 2  # initial + one push
    commits = [r for r in calls(hub, "POST", "/commit/") if f"/{repo}/" in r.path]
    assert len(commits) == 1
    lfs = [p for p, e in hub.history(repo)[0].files.items() if e.lfs_sha256]
    assert len(calls(hub, "PUT", "/upload/")) == len(lfs)  # every LFS object sent once


def test_create_pr_branch_and_private_repo(
    hub: HubServer, output: Path, published: dict[str, Any]
) -> None:
    add_files = """
from huggingface_hub import HfApi
for path in ARGS:  # a file a user added, and a shard an earlier push left behind
    HfApi().upload_file(path_or_fileobj=b"x", path_in_repo=path, repo_id="alice/pr-demo",
                        revision="dev")
"""
    user_file, stale = "samples/cat.txt", "transformer/diffusion_pytorch_model-00099.safetensors"
    check_private = """
from huggingface_hub import HfApi, hf_hub_download
api, repo = HfApi(), ARGS["repo"]
def err(fn):
    try:
        fn()
    except Exception as e:
        return [type(e).__name__, getattr(getattr(e, "response", None), "status_code", None)]
RESULT = {
    "anon": err(lambda: api.model_info(repo, token=False)),
    "anon_file": err(lambda: hf_hub_download(repo, "model_index.json", token=False)),
    "bob": err(lambda: api.model_info(repo, token=ARGS["bob"])),
    "owner": api.model_info(repo).private,
}
"""
    steps = [
        {"args": ["push", str(output), "--repo-id", "alice/pr-demo", "--create-pr", "-q"]},
        {"args": ["push", str(output), "--repo-id", "alice/pr-demo", "--revision", "dev", "-q"]},
        {"python": add_files, "args": [user_file, stale]},
        {"args": ["push", str(output), "--repo-id", "alice/pr-demo", "--revision", "dev", "-q"]},
        {"args": ["push", str(output), "--repo-id", "alice/secret", "--private", "-q"]},
        {"python": check_private, "args": {"repo": "alice/secret", "bob": BOB}},
        {"args": ["push", str(output), "--repo-id", published["repo"], "--private"]},
    ]
    pr, branch, _, again, private, check, public = drive(hub, steps)

    assert pr["code"] == 0, pr["output"]
    head = hub.head("alice/pr-demo", "refs/pr/1")
    assert f"opened {hub.endpoint}/alice/pr-demo/discussions/1" in pr["output"]
    assert f"commit {head})" in pr["output"] and "revision='refs/pr/1'" in pr["output"]
    assert set(hub.history("alice/pr-demo")[0].files) == {".gitattributes"}  # main untouched
    assert hub.read_file("alice/pr-demo", "qconvert.json", "refs/pr/1") == (
        (output / MANIFEST).read_bytes()
    )

    # --revision: a new branch, made from main; a re-push removes the stale shard, keeps the
    # user's file, and leaves main alone.
    assert branch["code"] == 0 and "(revision dev, commit" in branch["output"], branch["output"]
    assert "from_pretrained('alice/pr-demo', revision='dev')" in branch["output"]
    assert again["code"] == 0 and "pushed" in again["output"], again["output"]
    files = set(hub.history("alice/pr-demo", "dev")[0].files)
    assert user_file in files and stale not in files and MANIFEST in files
    assert len(hub.history("alice/pr-demo", "dev")) == 5  # initial, push, 2 uploads, push
    assert set(hub.history("alice/pr-demo")[0].files) == {".gitattributes"}

    assert private["code"] == 0, private["output"]
    assert hub.repos[("model", "alice/secret")].private
    value = check["value"]
    assert value["anon"] == ["RepositoryNotFoundError", 404]
    assert value["anon_file"] == ["RepositoryNotFoundError", 404]
    assert value["bob"] == ["RepositoryNotFoundError", 404] and value["owner"] is True

    # --private never publishes into an existing public repo
    failed(public, f"{published['repo']} already exists and is public")
    assert len(hub.history(published["repo"])) == 2


def test_token_order_and_auth_errors(hub: HubServer, output: Path, tmp_path: Path) -> None:
    repo = "alice/tokens"
    exists = {"python": "from huggingface_hub import HfApi\nRESULT = HfApi().repo_exists(ARGS)"}
    push_args = ["push", str(output), "--repo-id", repo, "-q"]
    steps = [
        {"args": push_args, "env": {"HF_TOKEN": None}},  # no token anywhere
        {"args": push_args, "env": {"HF_TOKEN": WRONG}},
        {**exists, "args": repo},
        {"args": [*push_args, "--token", ALICE], "env": {"HF_TOKEN": WRONG}},  # flag wins
        {"args": push_args, "env": {"HF_TOKEN": None}, "stored_token": ALICE},  # hf auth login
        {"args": [*push_args, "--token", WRONG]},
        {
            "args": ["flux", "--format", "nvfp4", "--tiny", "-o", str(tmp_path / "c"), "--push"],
            "env": {"HF_TOKEN": None},
        },
    ]
    none, wrong, existed, flag, stored, wrong_flag, convert = drive(hub, steps)
    failed(none, "not logged in", "hf auth login", "HF_TOKEN", "--token")
    failed(wrong, "rejected the token (401", "hf auth login")
    assert existed["value"] is False  # nothing was created, let alone half-pushed
    assert flag["code"] == 0 and "pushed" in flag["output"], flag["output"]
    assert stored["code"] == 0 and "already has these files" in stored["output"]
    failed(wrong_flag, "rejected the token (401")
    failed(convert, "not logged in")  # checked before converting: nothing was written
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())
    assert len(hub.history(repo)) == 2
    no_token_in(output / "README.md", output / MANIFEST)
    for name in ("README.md", MANIFEST):
        assert not any(t.encode() in hub.read_file(repo, name) for t in TOKENS)


def test_bad_repo_ids_and_someone_elses_repo(hub: HubServer, output: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    tiny = ["flux", "--format", "nvfp4", "--tiny", "-o", str(out)]
    steps = [
        {"args": ["push", str(output), "--repo-id", "alice/bad//id"]},
        {"args": ["push", str(output), "--repo-id", "alice/bad name"]},
        {"args": ["push", str(output), "--repo-id", "bob/taken", "-q"], "env": {"HF_TOKEN": BOB}},
        {"args": ["push", str(output), "--repo-id", "bob/taken", "-q"]},
        {"args": ["push", str(output), "--repo-id", "bob/new", "-q"]},
        {"args": [*tiny, "--push", "--repo-id", "bob/x"]},  # refused before converting
        {"args": [*tiny, "--private"]},
    ]
    slashes, space, bob, taken, new, early, usage = drive(hub, steps)
    failed(slashes, "repo id 'alice/bad//id' is malformed", "NAMESPACE/NAME")
    failed(space, "repo id 'alice/bad name' is malformed")
    assert bob["code"] == 0, bob["output"]
    failed(taken, "bob/taken: alice has no write access (403 Forbidden)", "alice/taken")
    failed(new, "bob/new: alice has no write access (403 Forbidden)")
    assert len(hub.history("bob/taken")) == 2 and hub.head("bob/new") is None
    failed(early, "alice cannot write to the namespace 'bob'")
    assert not out.exists()  # refused before converting
    assert usage["code"] == 2 and "--private needs --push" in usage["output"]


def test_network_failure_then_rerun_resumes(
    hub: HubServer, converted: dict[str, Path], tmp_path: Path
) -> None:
    out = Path(shutil.copytree(converted["mxfp8"], tmp_path / "mx"))  # objects not on the hub yet
    rows = json.loads((out / MANIFEST).read_text())["files"]
    shards = [r for r in rows if r["path"].startswith("transformer/diffusion_pytorch_model-")]
    shard = shards[1]
    hub.fail_next(6, status=503, path_contains=f"/upload/{shard['sha256']}")  # 1 try + 5 retries
    before = len(hub.requests)
    already = set(hub.lfs_objects)  # what earlier pushes to this server left (test order varies)
    args = ["push", str(out), "--repo-id", "alice/flaky", "-q"]
    failure, rerun = drive(hub, [{"args": args}, {"args": args}])

    line = failed(failure, "alice/flaky: upload failed after the client's retries")
    assert shard["path"] in line and "re-run the same command to resume" in line
    assert failure["slept"] == 5  # the client's own backoff, skipped
    puts = [r for r in hub.requests[before:] if r.method == "PUT"]
    assert [r.status for r in puts if shard["sha256"] in r.path] == [503] * 6 + [200]
    ok = [r.path.split("?")[0] for r in puts if r.status == 200]
    assert rerun["code"] == 0 and "pushed" in rerun["output"], rerun["output"]
    commits = hub.history("alice/flaky")
    assert len(commits) == 2  # nothing half-pushed: one commit, at the end
    lfs = {e.lfs_sha256 for e in commits[0].files.values() if e.lfs_sha256}
    assert {r["sha256"] for r in shards} <= lfs
    new = {f"/upload/{oid}" for oid in lfs - already}
    assert len(ok) == len(set(ok)) and set(ok) == new  # each new object sent once, in all


def test_refuses_a_folder_that_does_not_match_its_manifest(output: Path, tmp_path: Path) -> None:
    """Checked before any network call (no server needed)."""
    with pytest.raises(PushError, match="not a qconvert output"):
        push(tmp_path)
    bad = Path(shutil.copytree(output, tmp_path / "bad"))
    shard = sorted((bad / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(PushError, match=f"{shard}: differs from qconvert.json"):
        push(bad, "alice/x", token=ALICE)
    shard.unlink()
    with pytest.raises(PushError, match=f"{shard}: listed in qconvert.json but missing"):
        check_output(bad)
    shutil.copyfile(output / shard.relative_to(bad), shard)
    (bad / "vae" / "notes.txt").write_text("mine")
    with pytest.raises(PushError, match=r"notes\.txt: not part of this qconvert output"):
        check_output(bad)
    (bad / "vae" / "notes.txt").unlink()
    (bad / "quality.json").write_text('{"setup": "s", "rows": [{"lpips": 0.1}]}')
    assert check_output(bad)["tool"] == "qconvert"  # measurements and the card may be added


def test_convert_from_a_hub_source_with_push(
    hub: HubServer, tiny_flux: Path, tmp_path: Path
) -> None:
    """The base model's card metadata travels: Hub source → manifest → card → pushed repo."""
    source = Path(shutil.copytree(tiny_flux, tmp_path / "src"))
    (source / "LICENSE.md").write_text("FLUX.1 [dev] Non-Commercial License (test copy)\n")
    (source / "README.md").write_text(
        "---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\n"
        "license_link: LICENSE.md\ntags:\n- text-to-image\n---\n# FLUX.1 tiny\n"
    )
    upload = (
        "from huggingface_hub import HfApi\napi = HfApi(token=ARGS['token'])\n"
        "api.create_repo('bfl/FLUX.1-tiny')\n"
        "api.upload_folder(repo_id='bfl/FLUX.1-tiny', folder_path=ARGS['folder'])\n"
    )
    check = """
import torch
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
from qconvert.loaders import load_transformer
flat = lambda m: flatten_tensor_state_dict(m.state_dict())[0]
remote = load_transformer(ARGS["repo"], device="cpu")
a, b = flat(remote), flat(load_transformer(ARGS["folder"], device="cpu"))
RESULT = {"equal": sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b),
          "weight": type(remote.transformer_blocks[0].attn.to_q.weight).__name__}
"""
    out = tmp_path / "out"
    convert = ["flux", "--format", "nvfp4", "--source", "bfl/FLUX.1-tiny", "--transformer-only"]
    convert += ["-o", str(out), "-q", "--push", "--token", ALICE]
    repo = "alice/FLUX.1-tiny-nvfp4"
    steps = [
        {"python": upload, "args": {"token": BFL, "folder": str(source)}},
        {"args": convert, "env": {"HF_TOKEN": None}},
        {"python": check, "args": {"repo": repo, "folder": str(out)}},
    ]
    _, converted, loaded = drive(hub, steps, token=None)
    assert converted["code"] == 0, converted["output"]
    assert f"pushed {out} to {hub.endpoint}/{repo}" in converted["output"]
    assert f"load_transformer('{repo}')" in converted["output"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["card"] == {
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "LICENSE.md",
    }
    assert manifest["command"].endswith("--push --token '***'")  # the token is never recorded
    no_token_in(out / "README.md", out / MANIFEST)
    card = hub.read_file(repo, "README.md").decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "bfl/FLUX.1-tiny" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "other" and meta["license_link"] == "LICENSE.md"
    assert "**Restricted use.**" in card and "LICENSE.md" in hub.history(repo)[0].files
    assert f'load_transformer("{repo}")' in card
    assert loaded["value"] == {"equal": True, "weight": "NVFP4Tensor"}
