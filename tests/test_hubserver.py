"""The loopback Hub (tests/hubserver.py) driven by the real huggingface_hub client and diffusers.

Every client runs in a subprocess with a fresh ``HF_HOME`` (``HF_ENDPOINT`` is frozen when
huggingface_hub is first imported) and ``HF_HUB_DISABLE_XET=1``.

What a loopback server cannot prove: the Xet transport that real uploads and downloads use
(hf_xet, CAS, chunk dedup); real token scopes (fine-grained, read-only, org tokens, expiry);
gated repos and access requests; the Hub's model-card / YAML schema checks (only an unclosed
front-matter block is rejected here); renamed-repo redirects, CDN behaviour, rate limits and
quotas. It does prove the classic protocol as the client speaks it: preupload modes, LFS batch +
signed storage PUT without Authorization, NDJSON commits, no-op re-uploads, PR refs, strict
revisions, private repos, etags and the X-Error-Code error mapping.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hubserver import HubServer, RequestRecord, client_env, git_blob_sha1

ALICE = "hf_test_alice_write"  # fake tokens, only meaningful to HubServer
BOB = "hf_test_bob_write"
BIG = 10 * 1024 * 1024 + 17  # above the 10 MiB regular-file limit: LFS by size alone

PRELUDE = """
import json, sys
from pathlib import Path
import huggingface_hub as hh
from huggingface_hub import HfApi
api = HfApi()
ARGS = json.loads(sys.argv[1])

def out(obj):
    print("RESULT=" + json.dumps(obj, default=str))

def err(fn):
    try:
        fn()
    except Exception as e:
        return [type(e).__name__, getattr(getattr(e, "response", None), "status_code", None),
                str(e)]
    return None
"""


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(tokens={ALICE: "alice", BOB: "bob"}) as server:
        yield server
    assert not server.errors, server.errors


def run_client(
    hub: HubServer,
    script: str,
    token: str | None = ALICE,
    args: Any = None,
    env_overrides: dict[str, str | None] | None = None,
) -> Any:
    """Run ``script`` under the real client in a subprocess with a fresh HF_HOME; its out()."""
    with tempfile.TemporaryDirectory(prefix="hf_home_") as home:
        env = client_env(hub, Path(home), token)
        for key, value in (env_overrides or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        proc = subprocess.run(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(script), json.dumps(args)],
            env=env, capture_output=True, text=True, timeout=180, cwd=home,
        )
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")]
    assert results, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(results[-1][len("RESULT=") :])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_folder(root: Path) -> dict[str, bytes]:
    files = {
        "README.md": b"---\nlicense: apache-2.0\n---\n# demo\n",
        "config.json": json.dumps({"hidden_size": 8}).encode(),
        "model.safetensors": os.urandom(4096),
        "sub/big.txt": b"x" * BIG,
        "sub/notes.txt": b"small text\n",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def calls(hub: HubServer, method: str, fragment: str) -> list[RequestRecord]:
    return [r for r in hub.requests if r.method == method and fragment in r.path]


UPLOAD = """
api.create_repo(ARGS["repo"], exist_ok=True, private=ARGS.get("private", False))
info = api.upload_folder(repo_id=ARGS["repo"], folder_path=ARGS["folder"])
out({"oid": info.oid})
"""


def test_create_repo_exist_ok_twice(hub: HubServer) -> None:
    res = run_client(hub, """
        r1 = api.create_repo("alice/demo", exist_ok=True)
        r2 = api.create_repo("alice/demo", exist_ok=True)
        dup = err(lambda: api.create_repo("alice/demo"))
        api.create_repo("alice/gone")
        api.delete_repo("alice/gone")
        out({"r1": r1, "r2": r2, "id": r2.repo_id, "dup": dup, "me": api.whoami()["name"],
             "exists": api.repo_exists("alice/demo"), "gone": api.repo_exists("alice/gone")})
    """)
    assert res["r1"] == res["r2"] == f"{hub.endpoint}/alice/demo"
    assert res["id"] == "alice/demo" and res["me"] == "alice"
    assert res["exists"] is True and res["gone"] is False
    assert res["dup"][:2] == ["HfHubHTTPError", 409]
    assert [c.message for c in hub.history("alice/demo")] == ["initial commit"]


def test_upload_folder_roundtrip_and_noop_reupload(hub: HubServer, tmp_path: Path) -> None:
    files = make_folder(tmp_path / "src")
    args = {"repo": "alice/demo", "folder": str(tmp_path / "src")}
    first = run_client(hub, UPLOAD, args=args)["oid"]
    assert hub.head("alice/demo") == first
    modes = {p: hub.file_entry("alice/demo", p).lfs_sha256 is not None for p in files}
    assert modes == {"README.md": False, "config.json": False, "model.safetensors": True,
                     "sub/big.txt": True, "sub/notes.txt": False}
    puts = calls(hub, "PUT", "/upload/")
    assert len(puts) == 2 and not any(r.authorized for r in puts)

    # Same folder again: preupload returns the remote oids, the client skips the empty commit.
    assert run_client(hub, UPLOAD, args=args)["oid"] == first
    assert hub.head("alice/demo") == first and len(hub.history("alice/demo")) == 2
    assert len(calls(hub, "POST", "/commit/")) == 1 and len(calls(hub, "PUT", "/upload/")) == 2

    res = run_client(hub, """
        import hashlib
        repo = ARGS["repo"]
        digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
        single = {f: digest(hh.hf_hub_download(repo, f)) for f in ARGS["files"]}
        snap = Path(hh.snapshot_download(repo))
        info = api.model_info(repo, files_metadata=True)
        out({"single": single, "sha": info.sha,
             "snap": {str(p.relative_to(snap)): digest(p) for p in snap.rglob("*") if p.is_file()},
             "lfs": sorted(s.rfilename for s in info.siblings if s.lfs),
             "tree": sorted(api.list_repo_files(repo))})
    """, args={"repo": "alice/demo", "files": sorted(files)})
    expected = {p: sha256(d) for p, d in files.items()}
    assert res["single"] == expected
    assert res["snap"] == {**expected, ".gitattributes": res["snap"][".gitattributes"]}
    assert res["sha"] == first and res["lfs"] == ["model.safetensors", "sub/big.txt"]
    assert res["tree"] == sorted([*files, ".gitattributes"])
    assert calls(hub, "GET", "/download/"), "LFS files must come from the storage server"

    # Raw HTTP: quoted etags as the Hub sends them, redirect for LFS, Range on storage.
    head = urllib.request.Request(f"{hub.endpoint}/alice/demo/resolve/main/config.json",
                                  method="HEAD")
    with urllib.request.urlopen(head) as r:
        assert r.headers["ETag"] == f'"{git_blob_sha1(files["config.json"])}"'
        assert r.headers["X-Repo-Commit"] == first
    url = f"{hub.endpoint}/alice/demo/resolve/main/model.safetensors"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=10-19"})) as r:
        assert r.status == 206 and r.read() == files["model.safetensors"][10:20]
    with pytest.raises(urllib.error.HTTPError) as exc:  # storage refuses Authorization
        urllib.request.urlopen(urllib.request.Request(
            url, headers={"Authorization": f"Bearer {ALICE}"}))
    assert exc.value.code == 400


def test_create_pr_is_downloadable_by_revision(hub: HubServer, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"v": 1}')
    base = run_client(hub, UPLOAD, args={"repo": "alice/demo", "folder": str(tmp_path / "src")})
    res = run_client(hub, """
        import tempfile
        op = hh.CommitOperationAdd("config.json", b'{"v": 2}')
        pr = api.create_commit("alice/demo", [op], commit_message="v2", create_pr=True)
        cache = tempfile.mkdtemp(dir=".")
        get = lambda rev: Path(hh.hf_hub_download("alice/demo", "config.json", revision=rev,
                                                   cache_dir=cache)).read_text()
        api.create_branch("alice/demo", branch="dev")
        api.create_commit("alice/demo", [hh.CommitOperationAdd("config.json", b'{"v": 3}')],
                          commit_message="v3", revision="dev")
        refs = api.list_repo_refs("alice/demo", include_pull_requests=True)
        stale = err(lambda: api.create_commit(
            "alice/demo", [hh.CommitOperationAdd("x.txt", b"x")], commit_message="stale",
            parent_commit=ARGS["initial"]))
        out({"rev": pr.pr_revision, "num": pr.pr_num, "oid": pr.oid, "pr": get("refs/pr/1"),
             "main": get("main"), "by_sha": get(pr.oid), "dev": get("dev"), "stale": stale,
             "prs": [r.ref for r in refs.pull_requests],
             "branches": [r.name for r in refs.branches]})
    """, args={"initial": hub.history("alice/demo")[-1].sha})
    assert res["rev"] == "refs/pr/1" and res["num"] == 1
    assert (res["pr"], res["main"], res["by_sha"]) == ('{"v": 2}', '{"v": 1}', '{"v": 2}')
    assert res["dev"] == '{"v": 3}'
    assert res["prs"] == ["refs/pr/1"] and res["branches"] == ["dev", "main"]
    assert res["stale"][:2] == ["HfHubHTTPError", 412]
    assert hub.head("alice/demo") == base["oid"]
    assert hub.head("alice/demo", "refs/pr/1") == res["oid"]


def test_private_repo_is_invisible_without_owner_token(hub: HubServer, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    args = {"repo": "alice/secret", "folder": str(tmp_path / "src"), "private": True, "bob": BOB}
    run_client(hub, UPLOAD, args=args)
    res = run_client(hub, """
        import tempfile
        repo = ARGS["repo"]
        def dl(token):
            cache = tempfile.mkdtemp(dir=".")
            return hh.hf_hub_download(repo, "config.json", token=token, cache_dir=cache)
        out({"anon_info": err(lambda: api.model_info(repo, token=False)),
             "anon_dl": err(lambda: dl(False)),
             "bob_info": err(lambda: api.model_info(repo, token=ARGS["bob"])),
             "bob_dl": err(lambda: dl(ARGS["bob"])),
             "private": api.model_info(repo).private, "alice_dl": Path(dl(None)).read_text()})
    """, args=args)
    for key in ("anon_info", "anon_dl", "bob_info", "bob_dl"):
        assert res[key][:2] == ["RepositoryNotFoundError", 404], res[key]
    assert res["private"] is True and res["alice_dl"] == "{}"


def test_missing_repo_revision_and_entry_errors(hub: HubServer, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    run_client(hub, UPLOAD, args={"repo": "alice/demo", "folder": str(tmp_path / "src")})
    res = run_client(hub, """
        from huggingface_hub.errors import RemoteEntryNotFoundError
        dl = lambda repo, f, rev=None: hh.hf_hub_download(repo, f, revision=rev)
        entry = err(lambda: dl("alice/demo", "nope.json"))
        try:
            dl("alice/demo", "nope.json")
        except hh.errors.EntryNotFoundError as e:  # must be the remote one, not a cache miss
            entry.append(isinstance(e, RemoteEntryNotFoundError))
        out({"entry": entry, "repo": err(lambda: dl("alice/nope", "config.json")),
             "rev": err(lambda: dl("alice/demo", "config.json", "nope")),
             "info_rev": err(lambda: api.model_info("alice/demo", revision="nope")),
             "snap_rev": err(lambda: hh.snapshot_download("alice/demo", revision="nope")),
             "yaml": err(lambda: api.upload_file(path_or_fileobj=b"---\\nlicense: x\\n",
                                                 path_in_repo="README.md", repo_id="alice/demo")),
             "sha_rev": err(lambda: dl("alice/demo", "config.json", "0" * 40))})
    """)
    assert res["entry"][:2] == ["RemoteEntryNotFoundError", 404] and res["entry"][-1] is True
    assert res["repo"][:2] == ["RepositoryNotFoundError", 404]
    assert res["yaml"][0] == "ValueError" and "Invalid metadata" in res["yaml"][2]
    for key in ("rev", "info_rev", "snap_rev", "sha_rev"):
        assert res[key][:2] == ["RevisionNotFoundError", 404], res[key]


def test_writes_need_a_token_and_own_namespace(hub: HubServer) -> None:
    res = run_client(hub, """
        a, b = ARGS
        api.create_repo("alice/demo", token=a)
        api.create_repo("bob/public", token=b)
        api.create_repo("alice/private", token=a, private=True)
        up = lambda repo, token: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt",
                                                 repo_id=repo, token=token)
        out({"create_anon": err(lambda: api.create_repo("alice/anon")),
             "upload_anon": err(lambda: up("alice/demo", None)),
             "create_other": err(lambda: api.create_repo("bob/mine", token=a)),
             "upload_other": err(lambda: up("bob/public", a)),
             "upload_private": err(lambda: up("alice/private", b)),
             "bogus": err(lambda: api.whoami(token="hf_bogus"))})
    """, token=None, args=[ALICE, BOB])
    for key in ("create_anon", "upload_anon", "bogus"):
        assert res[key][1] == 401, res[key]
    assert res["create_other"][1] == 403 and res["upload_other"][1] == 403
    assert res["upload_private"][:2] == ["RepositoryNotFoundError", 404]  # invisible, not 403
    assert [len(hub.history(r)) for r in ("alice/demo", "bob/public", "alice/private")] == [1] * 3
    assert not calls(hub, "PUT", "/upload/") and not calls(hub, "POST", "/commit/")


def test_xet_guard_and_fault_injection(hub: HubServer) -> None:
    script = """
        api.create_repo("alice/demo", exist_ok=True)
        out({"e": err(lambda: api.upload_file(path_or_fileobj=b"\\0" * 64,
                                              path_in_repo="w.safetensors", repo_id="alice/demo"))})
    """
    xet = run_client(hub, script, env_overrides={"HF_HUB_DISABLE_XET": None})
    # hf_xet (Rust) fetches the token itself and reports only the status and URL, not the body.
    assert xet["e"] is not None and "501" in xet["e"][2] and "xet-write-token" in xet["e"][2]
    assert calls(hub, "GET", "/xet-write-token/")[-1].status == 501

    hub.fail_next(1, status=503, path_contains="/preupload/")  # the client retries once (1 s)
    assert run_client(hub, script)["e"] is None
    assert [r.status for r in calls(hub, "POST", "/preupload/")][-2:] == [503, 200]
    assert hub.read_file("alice/demo", "w.safetensors") == b"\0" * 64


def test_diffusers_from_pretrained_repo_id(hub: HubServer, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")  # local save only: no Hub access in this process
    model_dir = tmp_path / "tiny-vae"
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=2,
                                  norm_num_groups=8, sample_size=8)
    vae.save_pretrained(model_dir)
    run_client(hub, UPLOAD, args={"repo": "alice/tiny-vae", "folder": str(model_dir)})
    res = run_client(hub, """
        import torch
        from diffusers import AutoencoderKL
        remote = AutoencoderKL.from_pretrained(ARGS["repo"]).state_dict()
        local = AutoencoderKL.from_pretrained(ARGS["folder"]).state_dict()
        out({"n": len(remote), "same_keys": sorted(remote) == sorted(local),
             "equal": all(torch.equal(remote[k], local[k]) for k in local),
             "cached": any(Path(hh.constants.HF_HUB_CACHE).rglob("*.safetensors"))})
    """, token=None, args={"repo": "alice/tiny-vae", "folder": str(model_dir)})
    assert res["n"] > 0 and res["same_keys"] and res["equal"] and res["cached"]
    assert hub.file_entry("alice/tiny-vae", "diffusion_pytorch_model.safetensors").lfs_sha256
    assert calls(hub, "GET", "/download/"), "weights must be fetched from the server"


def test_commit_rules_over_raw_http(hub: HubServer) -> None:
    """Hub rules the client never trips by itself, checked on one keep-alive connection."""
    conn = http.client.HTTPConnection(*hub.endpoint.removeprefix("http://").split(":"))

    def call(method: str, path: str, body: bytes = b"", token: str | None = ALICE) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.headers.get("X-Error-Code"), json.loads(resp.read() or b"null")

    def commit(*ops: dict[str, Any], token: str | None = ALICE) -> Any:
        lines = [{"key": "header", "value": {"summary": "raw"}}, *ops]
        body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        return call("POST", "/api/models/alice/raw/commit/main", body, token)

    assert call("POST", "/api/repos/create", b'{"name": "raw"}')[0] == 200
    initial = hub.head("alice/raw")
    binary = {"key": "file", "value": {"path": "w.bin", "encoding": "base64",
                                       "content": base64.b64encode(b"\0\1\2").decode()}}
    missing = {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256",
                                           "oid": "0" * 64, "size": 3}}
    assert commit(binary, token=None)[0] == 401  # unread bodies are drained: the connection lives
    assert commit(binary)[0] == 400 and commit(missing)[0] == 400
    assert commit({"key": "deletedFile", "value": {"path": "nope"}})[:2] == (404, "EntryNotFound")
    assert hub.head("alice/raw") == initial
    status, _, reply = commit()  # an empty commit is allowed; the client skips it by itself
    assert status == 200 and hub.head("alice/raw") == reply["commitOid"] != initial
    assert hub.history("alice/raw")[0].files == hub.history("alice/raw")[1].files
    assert call("GET", "/api/models/alice/raw/revision/nope")[:2] == (404, "RevisionNotFound")
    assert call("GET", "/api/models/alice/raw/xet-read-token/main")[0] == 501
    conn.close()
