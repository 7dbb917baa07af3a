"""What leaves the machine (issue 11): a malicious Hub repo cannot make qconvert read or push a
user's files; tokens are stripped, checked and never shown; an unreachable Hub is one line; a
manifest cannot make push upload files outside the output; cards escape what qconvert did not
write.

The Hub is tests/hubserver.py on loopback, driven by the real huggingface_hub client in
subprocesses (``HF_ENDPOINT`` is read when huggingface_hub is imported). Every CLI run there
records each file the process opens (an audit hook), so "nothing outside is read" is checked,
not assumed. A loopback server cannot prove the Xet transport, real token scopes or gated
repos."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hubserver import HubServer, client_env
from safety_fixtures import INDEX, secret_file, sparse_pipeline

from qconvert.cards import render_card
from qconvert.convert import convert
from qconvert.hub import PushError, _scrub, push
from qconvert.manifest import sha256_file
from qconvert.tiny.synthetic import write_flux_source

ALICE = "hf_test_alice_write_0c4a1f2e"
EVIL = "hf_test_evil_write_77aa01bc"
UPLOAD = """
import json, sys
from huggingface_hub import HfApi
api = HfApi()
for repo_id, folder in json.loads(sys.argv[1]).items():
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="x")
"""
DRIVER = r"""
import json, os, sys
OPENED = []

def audit(event, args):
    if event == "open" and args and isinstance(args[0], str):
        OPENED.append(os.path.realpath(args[0]))

sys.addaudithook(audit)
from click.testing import CliRunner
from qconvert.cli import main

results = []
for args in json.loads(sys.argv[1]):
    OPENED.clear()
    if isinstance(args, str):  # a Python step: what it prints is its output
        import contextlib, io
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(args, {})
            code = 0
        except Exception as e:
            out.write(f"{type(e).__name__}: {e}\n")
            code = 1
        results.append({"code": code, "output": out.getvalue(), "error": None,
                        "opened": sorted(set(OPENED))})
        continue
    run = CliRunner().invoke(main, args)
    error = None if isinstance(run.exception, (SystemExit, type(None))) else repr(run.exception)
    results.append({"code": run.exit_code, "output": run.output, "error": error,
                    "opened": sorted(set(OPENED))})
print("RESULT=" + json.dumps(results))
"""


def drive(hub: HubServer | None, steps: list[list[str]], token: str | None = ALICE,
          endpoint: str | None = None) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as home:
        if hub is not None:
            env = client_env(hub, Path(home), token)
        else:
            env = {**client_env_closed(Path(home)), "HF_ENDPOINT": str(endpoint)}
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, json.dumps(steps)],
            env=env, text=True, capture_output=True, timeout=300, check=False,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT="))
    results = json.loads(line[len("RESULT="):])
    for r in results:
        assert r["error"] is None, r  # a traceback is a bug
    return results


def client_env_closed(home: Path) -> dict[str, str]:
    class _Nowhere:
        endpoint = "http://127.0.0.1:9"

    return client_env(_Nowhere(), home)  # type: ignore[arg-type]


def last_line(result: dict[str, Any]) -> str:
    lines = result["output"].strip().splitlines()
    assert lines and "Traceback" not in result["output"], result
    return lines[-1]


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's files an attacker is after."""
    return secret_file(tmp_path_factory.mktemp("home") / "private")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, outside: Path) -> Iterator[HubServer]:
    with HubServer(tokens={ALICE: "alice", EVIL: "evil"}) as server:
        staged = tmp_path_factory.mktemp("staged")
        repos = {}
        # 1. The transformer's index maps one tensor to a file on the user's disk.
        absolute = sparse_pipeline(staged / "absolute")
        index = absolute / "transformer" / INDEX
        data = json.loads(index.read_text())
        data["weight_map"]["x_embedder.weight"] = str(outside)
        index.write_text(json.dumps(data))
        repos["evil/absolute"] = absolute
        # 2. The same through '..' out of the Hugging Face cache.
        relative = sparse_pipeline(staged / "relative")
        index = relative / "transformer" / INDEX
        data = json.loads(index.read_text())
        data["weight_map"]["x_embedder.weight"] = "../" * 12 + str(outside).lstrip("/")
        index.write_text(json.dumps(data))
        repos["evil/relative"] = relative
        # 3. model_index.json names a component folder outside the repo.
        key = sparse_pipeline(staged / "key")
        model_index = json.loads((key / "model_index.json").read_text())
        model_index["../" * 12 + str(outside.parent).lstrip("/")] = ["diffusers", "AutoencoderKL"]
        (key / "model_index.json").write_text(json.dumps(model_index))
        repos["evil/key"] = key
        with tempfile.TemporaryDirectory() as home:
            subprocess.run(
                [sys.executable, "-c", UPLOAD, json.dumps({k: str(v) for k, v in repos.items()})],
                env=client_env(server, Path(home), EVIL), check=True, timeout=120,
            )
        yield server
    assert not server.errors, server.errors


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "pipe"
    write_flux_source(src, num_layers=0, num_single_layers=1)
    out = tmp_path_factory.mktemp("out") / "pipe-nvfp4"
    return convert(out, source=src, fmt="nvfp4", progress=False, command="test").output


MALICIOUS = ("evil/absolute", "evil/relative", "evil/key")


@pytest.fixture(scope="module")
def hub_runs(
    hub: HubServer, output: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The runs against the loopback Hub, in two client processes (a process costs seconds of
    imports): the malicious repos converted with --push (HF_TOKEN set, so the push would go),
    then pushes with tokens in various shapes (no HF_TOKEN)."""
    tmp = tmp_path_factory.mktemp("runs")
    token_file = tmp / "token"
    token_file.write_text(ALICE + "\n")  # a token file read as is
    steps: list[Any] = [
        ["flux", "--format", "nvfp4", "--source", repo, "-o", str(tmp / repo), "-q",
         "--push", "--repo-id", f"alice/{repo.split('/')[1]}"]
        for repo in MALICIOUS
    ]
    first = len(hub.requests)
    results = drive(hub, steps, token=ALICE)
    malicious_requests = list(hub.requests[first:])
    results += drive(hub, [
        "from pathlib import Path\nfrom qconvert.hub import push\n"
        f"r = push({str(output)!r}, 'alice/api', token=Path({str(token_file)!r}).read_text())\n"
        "print('pushed', r.repo_id)\n",
        ["push", str(output), "--repo-id", "alice/cli", "--token", ALICE + "\n", "-q"],
        ["push", str(output), "--repo-id", "alice/x", "--token", "hf_two words", "-q"],
        ["push", str(output), "--repo-id", "alice/x", "--token", ALICE[:8] + "\x00\r\n", "-q"],
    ], token=None)
    return {"results": results, "tmp": tmp, "requests": malicious_requests}


def test_a_malicious_hub_repo_reads_and_pushes_nothing_outside(
    hub: HubServer, hub_runs: dict[str, Any], outside: Path
) -> None:
    results = hub_runs["results"][:3]
    messages = [last_line(r) for r in results]
    assert all(r["code"] == 1 for r in results), messages
    assert f"weight_map entry (tensor 'x_embedder.weight') {str(outside)!r} is an absolute" \
        in messages[0]
    assert "weight_map entry (tensor 'x_embedder.weight')" in messages[1]
    assert "climbs out with '..'" in messages[1]
    assert "is not a plain folder name" in messages[2]
    private = str(outside.parent.resolve())
    for r in results:
        assert not [p for p in r["opened"] if p.startswith(private)], r["opened"]
    for repo in MALICIOUS:
        assert hub.head(f"alice/{repo.split('/')[1]}") is None  # nothing pushed
    assert not [r for r in hub_runs["requests"] if "/commit/" in r.path or "preupload" in r.path]
    assert not (hub_runs["tmp"] / "evil").exists()  # not even the empty folders of -o


def test_tokens_are_stripped_checked_and_never_shown(
    hub: HubServer, hub_runs: dict[str, Any]
) -> None:
    api, cli_ok, *bad = hub_runs["results"][3:]
    assert api["code"] == 0 and "pushed alice/api" in api["output"], api
    assert cli_ok["code"] == 0 and hub.head("alice/cli") and hub.head("alice/api"), cli_ok
    for r in bad:
        line = last_line(r)
        assert r["code"] == 1 and "holds spaces, control or non-ASCII characters" in line
        assert "network" not in line and "words" not in r["output"] and ALICE[:8] not in line
    for r in hub_runs["results"]:
        assert ALICE not in r["output"] and EVIL not in r["output"]


def test_scrub_removes_every_form_of_the_token() -> None:
    token = ALICE + "\n"
    for text in (f"Illegal header value b'Bearer {ALICE}\\n'", f"Bearer {token}", repr(token),
                 f"token={ALICE}", f"authorization: bearer {ALICE[:-3]}"):
        assert ALICE[:-3] not in _scrub(text, token), text


def test_an_unreachable_hub_is_one_line(tmp_path: Path) -> None:
    """The download and header paths (a push that cannot reach the Hub is test_push's)."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    results = drive(None, [
        ["flux", "--format", "nvfp4", "--source", "org/repo", "-o", str(tmp_path / "a/x"), "-q"],
        ["plan", "flux", "--format", "nvfp4", "--source", "org/repo"],
    ], token=None, endpoint=endpoint)
    for r in results:
        line = last_line(r)
        assert r["code"] == 1 and line.startswith("Error: ") and endpoint in line, line
        assert "could not reach" in line
    assert not (tmp_path / "a").exists()


def test_push_uploads_nothing_outside_the_output(
    output: Path, outside: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(output, out)
    manifest = json.loads((out / "qconvert.json").read_text())
    row = {"path": str(outside), "size": outside.stat().st_size, "sha256": sha256_file(outside)}
    for entry in (str(outside), "../" * 20 + str(outside).lstrip("/")):
        bad = {**manifest, "files": [*manifest["files"], {**row, "path": entry}]}
        (out / "qconvert.json").write_text(json.dumps(bad))
        with pytest.raises(PushError, match="refusing") as e:
            push(out, "alice/x", token="never-used")
        assert repr(entry) in str(e.value) and "\n" not in str(e.value)
    (out / "qconvert.json").write_text(json.dumps(manifest))
    for name in ("quality.json", "README.md"):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(outside.parent / "shadow")
        with pytest.raises(PushError, match="symbolic link"):
            push(out, "alice/x", token="never-used")
        (out / name).unlink()
    assert (outside.parent / "shadow").read_text() == "root:secret\n"  # never written through


# -- cards escape what qconvert did not write ---------------------------------------------------

EVIL_LINK = "](https://evil.example/steal) <img src=x onerror=alert(1)> [click](javascript:x)"


def _tokens(text: str) -> list[Any]:
    from markdown_it import MarkdownIt

    body = text.split("\n---\n", 1)[1]
    out = []
    for token in MarkdownIt("commonmark").enable("table").parse(body):
        out.append(token)
        out += token.children or []
    return out


def test_cards_escape_manifest_and_measurement_strings(output: Path, tmp_path: Path) -> None:
    out = tmp_path / "card"
    out.mkdir()
    manifest = json.loads((output / "qconvert.json").read_text())
    manifest["command"] = "qconvert flux -o x\n```\n# pwned" + EVIL_LINK
    manifest["source"]["path"] = "/data/`x`" + EVIL_LINK
    manifest["source"]["card"] = {
        "license": "other\nbase_model: evil",
        "license_name": "my `license`\n# pwned" + EVIL_LINK,
        "license_link": "javascript:alert(1)",
    }
    manifest["recipe"]["notes"] = ["# pwned" + EVIL_LINK]
    manifest["recipe"]["extra_skips"] = ["a`b|c" + EVIL_LINK]
    manifest["layers"][0].update(action="keep", reason="r|" + EVIL_LINK)
    manifest["versions"]["torch"] = "2.13 -->" + EVIL_LINK
    manifest["source"]["base_model"] = {
        "repo_id": "black-forest-labs/FLUX.1-dev", "revision": "main`" + EVIL_LINK,
        "commit": "`" + EVIL_LINK, "from": "flag",
    }  # fmt: skip
    manifest["files"][0]["path"] = "vae/`x`|y" + EVIL_LINK
    (out / "qconvert.json").write_text(json.dumps(manifest))
    (out / "quality.json").write_text(json.dumps({
        "setup": "# pwned" + EVIL_LINK, "device": EVIL_LINK, "command": "x` " + EVIL_LINK,
        "rows": [{"metric" + EVIL_LINK: "a|b" + EVIL_LINK, "value": 1}],
    }))
    text = render_card(out)
    front = yaml.safe_load(text.split("---\n")[1])
    assert front.get("license_link") is None and front.get("license") is None
    assert "base_model" not in front or front["base_model"] != "evil"
    tokens = _tokens(text)
    links = [t.attrs.get("href", "") for t in tokens if t.type == "link_open"]
    assert not [h for h in links if "evil" in str(h) or "javascript" in str(h)], links
    assert not [t for t in tokens if t.type == "image"]
    html = [t.content for t in tokens if t.type in ("html_inline", "html_block")]
    assert not [h for h in html if "evil" in h or "img" in h or "onerror" in h], html
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert not [h for h in headings if "pwned" in h], headings
    fences = [t.content for t in tokens if t.type == "fence"]
    assert any(manifest["command"] in f for f in fences)  # the whole command, in one block


def _string_fields(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _string_fields(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _string_fields(v, (*path, i))
    elif isinstance(value, str):
        yield path


@pytest.mark.parametrize("origin", ["flag", "hub cache path", "local-dir metadata"])
def test_no_manifest_string_opens_markdown(output: Path, tmp_path: Path, origin: str) -> None:
    """Every string of a manifest, one at a time, with a backtick, a heading and a link/HTML
    payload appended: the card renders it without a link, image, raw HTML or heading of its own
    (or refuses the manifest in one error)."""
    from qconvert.cards import CardError

    evil = "`\n# pwned\n" + EVIL_LINK
    manifest = json.loads((output / "qconvert.json").read_text())
    manifest["source"]["base_model"] = {
        "repo_id": "black-forest-labs/FLUX.1-dev", "revision": "main", "commit": "0" * 40,
        "from": origin,
    }  # fmt: skip
    manifest["source"]["card"] = {"license": "other", "license_name": "x", "license_link": "L.md"}
    fields = list(_string_fields(manifest))
    assert len(fields) > 40
    out = tmp_path / "card"
    shutil.copytree(output, out)
    for field in fields:
        changed = json.loads(json.dumps(manifest))
        holder = changed
        for key in field[:-1]:
            holder = holder[key]
        holder[field[-1]] += evil
        (out / "qconvert.json").write_text(json.dumps(changed))
        try:
            tokens = _tokens(render_card(out))
        except CardError:
            continue
        links = [t.attrs.get("href", "") for t in tokens if t.type == "link_open"]
        assert not [h for h in links if "evil" in str(h) or "javascript" in str(h)], field
        assert not [t for t in tokens if t.type == "image"], field
        html = [t.content for t in tokens if t.type in ("html_inline", "html_block")]
        assert not [h for h in html if "evil" in h or "onerror" in h], field
        headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
        assert not [h for h in headings if "pwned" in h], field


def test_card_repo_id_is_validated(output: Path) -> None:
    from click.testing import CliRunner

    from qconvert.cli import main

    for bad in ("a/b/c", 'x"); import os; ("', "-x", "a//b"):
        result = CliRunner().invoke(main, ["card", str(output), "--repo-id", bad])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "is malformed" in result.output.strip().splitlines()[-1]
