"""`qconvert build` end to end with the real huggingface_hub client and diffusers against the
loopback Hub (tests/hubserver.py, through test_push's fixtures and driver): a spec of tiny FLUX ×
{nvfp4, mxfp8} + tiny Qwen-Image nvfp4 builds three repos that plain diffusers loads by repo id
in a fresh cache; running it again makes no commit and downloads nothing but each repo's
qconvert.json; changing one target's recipe rebuilds that target alone; a broken target stops
the run, or under --keep-going leaves the others built, and exits 1; a Hub source is resolved to
its commit, planned from headers (--dry-run) and up to date on the next run. Offline: an
interrupted build resumes and ends byte-identical to an uninterrupted one.

All Hub steps run in one client subprocess (``HF_ENDPOINT`` is frozen at import); a marker
request (``repo_exists("mark/N")``) between steps splits the server's request log per step.
What a loopback server cannot prove is listed in tests/test_push.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import test_push
import torch
from click.testing import CliRunner
from hubserver import HubServer
from test_push import ALICE, BFL, drive

from qconvert.build.run import _flags
from qconvert.cli import main
from qconvert.convert import plan_target, selection_for, writer
from qconvert.formats import FORMATS

hub = test_push.hub  # the loopback Hub fixture (module scope), reused

SPEC = """
[defaults]
repo = "alice/{name}-{format}"

[[target]]
family = "flux"
tiny = true
formats = ["nvfp4"]

[[target]]
family = "flux"
tiny = true
formats = ["mxfp8"]
recipe = "flux.toml"

[[target]]
family = "qwenimage"
tiny = true
formats = ["nvfp4"]
"""
BROKEN = '[[target]]\nfamily = "flux"\nsource = "alice/no-such-model"\nformats = ["fp8"]\n'
HUB_SOURCE = """
[[target]]
family = "flux"
source = "bfl/FLUX.1-tiny"
formats = ["fp8"]
transformer-only = true
repo = "alice/{name}-{format}"
"""
RECIPE = '[[rule]]\npattern = "re:^transformer_blocks\\\\.0\\\\."\nformat = "{action}"\n'
REPOS = ["alice/tiny-flux-nvfp4", "alice/tiny-flux-mxfp8", "alice/tiny-qwenimage-nvfp4"]
MARK = "from huggingface_hub import HfApi\nHfApi().repo_exists(ARGS)"
LOAD = """
import tempfile
import torch
from diffusers import DiffusionPipeline
RESULT = {}
for repo in ARGS:
    pipe = DiffusionPipeline.from_pretrained(repo, dtype=torch.bfloat16,
                                             cache_dir=tempfile.mkdtemp())  # a fresh cache
    linears = [m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]
    RESULT[repo] = {"pipeline": type(pipe).__name__,
                    "weights": sorted({type(m.weight).__name__ for m in linears})}
"""
UPLOAD = """
from huggingface_hub import HfApi
api = HfApi(token=ARGS["token"])
api.create_repo("bfl/FLUX.1-tiny")
api.upload_folder(repo_id="bfl/FLUX.1-tiny", folder_path=ARGS["folder"])
"""


def summary(step: dict[str, Any]) -> dict[str, Any]:
    """The --json summary: the last thing on stdout (progress lines come before it)."""
    text = step["output"]
    assert step["error"] is None, text
    return json.loads(text[text.index("\n{\n") + 1 :] if not text.startswith("{") else text)


def statuses(step: dict[str, Any]) -> dict[str, str]:
    return {t["name"]: t["status"] for t in summary(step)["targets"]}


def heads(hub: HubServer) -> dict[str, int]:
    return {repo: len(hub.history(repo)) for repo in REPOS}


@pytest.fixture(scope="module")
def session(hub: HubServer, tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("build")
    (root / "flux.toml").write_text(RECIPE.replace("{action}", "keep"))
    spec = root / "spec.toml"
    spec.write_text(SPEC)
    broken = root / "broken.toml"  # the broken target first, then the spec's three
    broken.write_text(SPEC.replace("[[target]]", BROKEN + "\n[[target]]", 1))
    from_hub = root / "hub.toml"
    from_hub.write_text(HUB_SOURCE)
    step_summary = root / "step-summary.md"
    first, fresh = root / "out-1", root / "out-2"  # a fresh runner for every rerun

    def build(path: Path, out: Path, *extra: str, **env: str) -> dict[str, Any]:
        args = ["build", str(path), "--push", "--json", "-q", "-o", str(out), *extra]
        return {"args": args, "env": env}

    steps = [
        build(spec, first),
        {"python": MARK, "args": "mark/1"},
        {"python": LOAD, "args": REPOS},
        {"python": MARK, "args": "mark/2"},
        build(spec, fresh),
        {"python": MARK, "args": "mark/3"},
        {
            "python": f"open({str(root / 'flux.toml')!r}, 'w').write(ARGS)",
            "args": RECIPE.replace("{action}", "nvfp4"),
        },
        build(broken, fresh),
        build(broken, fresh, "--keep-going", GITHUB_STEP_SUMMARY=str(step_summary)),
        {"python": MARK, "args": "mark/4"},
        {"python": UPLOAD, "args": {"token": BFL, "folder": str(tiny_flux)}},
        {"python": MARK, "args": "mark/5"},
        build(from_hub, fresh, "--dry-run"),
        {"python": MARK, "args": "mark/6"},
        build(from_hub, fresh),
        {"python": MARK, "args": "mark/7"},
        build(from_hub, root / "out-3"),
    ]
    start = len(hub.requests)
    results = drive(hub, steps, token=ALICE)
    log = hub.requests[start:]
    cuts = [i for i, r in enumerate(log) if "/api/models/mark/" in r.path]
    segments = [log[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(log)], strict=True)]
    return {"results": results, "segments": segments, "root": root, "summary": step_summary}


def test_builds_three_repos_plain_diffusers_loads(hub: HubServer, session: Any) -> None:
    first, loaded = session["results"][0], session["results"][2]["value"]
    assert first["code"] == 0, first["output"]
    data = summary(first)
    assert data["exit_code"] == 0 and data["counts"] == {"built": 3}
    for target, repo in zip(data["targets"], REPOS, strict=True):
        assert target["repo"] == repo and target["commit"] == hub.history(repo)[-2].sha
        manifest = json.loads(hub.read_file(repo, "qconvert.json", target["commit"]))
        assert manifest["build"]["fingerprint"] == target["fingerprint"]
        assert manifest["build"]["target"] == target["name"]
        assert manifest["command"].startswith(f"qconvert {target['name'].split('-')[1]} ")
        card = hub.read_file(repo, "README.md", target["commit"]).decode()
        assert f'from_pretrained("{repo}"' in card
    assert [c.message for c in hub.history(REPOS[0])][-1] == "initial commit"
    assert loaded == {
        REPOS[0]: {"pipeline": "FluxPipeline", "weights": ["NVFP4Tensor", "Parameter"]},
        REPOS[1]: {"pipeline": "FluxPipeline", "weights": ["MXTensor", "Parameter"]},
        REPOS[2]: {"pipeline": "QwenImagePipeline", "weights": ["NVFP4Tensor", "Parameter"]},
    }
    downloads = [r for r in session["segments"][1] if r.server == "storage"]
    assert downloads and all(r.method == "GET" and r.status == 200 for r in downloads)


def test_rerun_makes_no_commit_and_downloads_only_each_qconvert_json(session: Any) -> None:
    again = session["results"][4]
    assert again["code"] == 0, again["output"]
    assert set(statuses(again).values()) == {"up to date"}
    requests = session["segments"][2]
    assert {(r.method, r.path) for r in requests} == {
        (method, f"/{repo}/resolve/main/qconvert.json")
        for repo in REPOS
        for method in ("HEAD", "GET")
    }
    assert all(r.server == "api" for r in requests)  # no weights, no commits, no whoami


def test_a_changed_recipe_rebuilds_that_target_alone_keep_going(
    hub: HubServer, session: Any
) -> None:
    stopped, kept_going = session["results"][7], session["results"][8]
    assert stopped["code"] == 1
    assert statuses(stopped) == {
        "no-such-model-fp8": "failed",
        "tiny-flux-nvfp4": "not run",
        "tiny-flux-mxfp8": "not run",
        "tiny-qwenimage-nvfp4": "not run",
    }
    error = summary(stopped)["targets"][0]["error"]
    assert (
        error == "source alice/no-such-model: repo not found (or private: set HF_TOKEN or "
        "`hf auth login`)"
    )
    assert kept_going["code"] == 1
    assert statuses(kept_going) == {
        "no-such-model-fp8": "failed",
        "tiny-flux-nvfp4": "up to date",
        "tiny-flux-mxfp8": "built",
        "tiny-qwenimage-nvfp4": "up to date",
    }
    assert heads(hub) == {REPOS[0]: 2, REPOS[1]: 3, REPOS[2]: 2}  # one new commit: flux mxfp8
    manifest = json.loads(hub.read_file(REPOS[1], "qconvert.json"))
    rules = manifest["recipe"]["recipe_file"]["rules"]
    assert [r["format"] for r in rules] == ["nvfp4"]
    assert sorted(manifest["formats"]) == ["mxfp8", "nvfp4"]
    old = json.loads(hub.read_file(REPOS[1], "qconvert.json", hub.history(REPOS[1])[1].sha))
    assert old["build"]["fingerprint"] != manifest["build"]["fingerprint"]
    assert old["build"]["inputs"]["recipe"] != manifest["build"]["inputs"]["recipe"]
    assert {k: v for k, v in old["build"]["inputs"].items() if k != "recipe"} == {
        k: v for k, v in manifest["build"]["inputs"].items() if k != "recipe"
    }
    markdown = session["summary"].read_text()
    assert "| `tiny-flux-mxfp8` | built | [alice/tiny-flux-mxfp8](" in markdown
    assert "| `no-such-model-fp8` | failed | `alice/no-such-model-fp8` |" in markdown
    assert "1 failed, 2 up to date, 1 built; exit code 1" in markdown


def test_hub_source_resolves_plans_from_headers_and_is_up_to_date(
    hub: HubServer, session: Any
) -> None:
    dry, built, again = (session["results"][i] for i in (12, 14, 16))
    source_head = hub.head("bfl/FLUX.1-tiny")
    assert dry["code"] == 0, dry["output"]
    planned = summary(dry)["targets"][0]
    assert planned["status"] == "would build"
    assert planned["plan"]["quantized_layers"] > 0
    assert not [r for r in session["segments"][5] if r.method in ("POST", "PUT")]  # no writes
    touched = {r.path.split("?")[0] for r in session["segments"][5] if r.server == "api"}
    assert not [p for p in touched if "/vae/" in p or "/text_encoder" in p]  # headers only
    assert built["code"] == 0, built["output"]
    target = summary(built)["targets"][0]
    assert target["status"] == "built" and target["commit"] == hub.head("alice/FLUX.1-tiny-fp8")
    manifest = json.loads(hub.read_file("alice/FLUX.1-tiny-fp8", "qconvert.json"))
    assert manifest["build"]["inputs"]["source"] == {
        "kind": "hub",
        "repo_id": "bfl/FLUX.1-tiny",
        "commit": source_head,
    }
    assert manifest["source"]["commit"] == source_head
    assert f"--revision {source_head}" in manifest["command"]
    assert again["code"] == 0 and statuses(again) == {"FLUX.1-tiny-fp8": "up to date"}
    requests = session["segments"][7]
    assert {r.path.split("?")[0] for r in requests} == {
        "/api/models/bfl/FLUX.1-tiny",
        "/alice/FLUX.1-tiny-fp8/resolve/main/qconvert.json",
    }


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


KILL = r"""
import os, signal, sys
from qconvert.convert import writer

real, calls = writer._quantize, []

def dying(*args):
    calls.append(1)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind
    return real(*args)

writer._quantize = dying
from qconvert.cli import main
main(["build", sys.argv[1], "-q", "-o", sys.argv[3]])
"""


class Offline:
    """Builds of one tiny-FLUX mxfp8 target (local source, 10 MB shards) in this process,
    counting (and optionally interrupting) the converter's quantize calls."""

    def __init__(self, tiny_flux: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.spec = root / "spec.toml"
        self.spec.write_text(
            f'[[target]]\nfamily = "flux"\nsource = "{tiny_flux}"\nformats = ["mxfp8"]\n'
            'repo = "alice/{name}-{format}"\nmax-shard-size = "10MB"\n'
        )
        self.calls: list[int] = []
        self.stop_at: int | None = None
        real = writer._quantize

        def counting(*args: Any) -> dict[str, torch.Tensor]:
            self.calls.append(1)
            if len(self.calls) == self.stop_at:
                raise KeyboardInterrupt
            return real(*args)

        monkeypatch.setattr(writer, "_quantize", counting)

    def run(self, out: Path, *extra: str) -> tuple[int, dict[str, Any]]:
        self.calls.clear()
        args = ["build", str(self.spec), "--json", "-q", "-o", str(out), *extra]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        return result.exit_code, json.loads(result.stdout)["targets"][0]


@pytest.fixture(scope="module")
def reference(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted build: its files, fingerprint and number of quantize calls."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as monkeypatch:
        builder = Offline(tiny_flux, root, monkeypatch)
        code, ref = builder.run(root / "out")
    assert code == 0 and ref["status"] == "built" and not ref["resumed"]
    output = root / "out" / "tiny-flux-mxfp8" / "output"
    return {**ref, "calls": len(builder.calls), "tree": tree(output), "output": output}


@pytest.fixture
def offline(tiny_flux: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Offline:
    return Offline(tiny_flux, tmp_path, monkeypatch)


def test_an_interrupted_build_resumes(
    offline: Offline, reference: dict[str, Any], tmp_path: Path
) -> None:
    """Offline (no --push): Ctrl-C mid-target keeps the finished shards; the rerun continues
    them and ends byte-identical to an uninterrupted build; changed inputs start over."""
    ref, total = reference, reference["calls"]
    out = tmp_path / "out"
    state = out / "tiny-flux-mxfp8"
    offline.stop_at = total * 2 // 3
    code, interrupted = offline.run(out)
    assert code == 130 and interrupted["status"] == "interrupted"
    assert "re-run the same build to resume" in interrupted["error"]
    partial = [p for p in state.iterdir() if p.name.endswith(".qconvert-partial")]
    assert len(partial) == 1 and not (state / "output").exists()
    done = json.loads((partial[0] / "progress.json").read_text())["done"]
    assert len(done) >= 2
    offline.stop_at = None
    code, resumed = offline.run(out)
    assert code == 0 and resumed["status"] == "built" and resumed["resumed"]
    assert "resumed an interrupted conversion" in resumed["notes"]
    assert len(offline.calls) < total  # the finished shards were not converted again
    assert tree(state / "output") == ref["tree"]
    assert sorted(p.name for p in state.iterdir()) == ["build.json", "output"]
    code, again = offline.run(out)
    assert code == 0 and again["status"] == "up to date" and again["where"] == "local"
    assert offline.calls == []
    offline.spec.write_text(offline.spec.read_text() + 'skip = ["ff_context"]\n')
    code, planned = offline.run(out, "--dry-run")
    assert code == 0 and planned["status"] == "would build" and offline.calls == []
    code, changed = offline.run(out)
    assert code == 0 and changed["status"] == "built" and not changed["resumed"]
    assert changed["fingerprint"] != ref["fingerprint"]
    manifest = json.loads((state / "output" / "qconvert.json").read_text())
    assert manifest["recipe"]["extra_skips"] == ["ff_context"]
    assert manifest["build"]["fingerprint"] == changed["fingerprint"]
    assert manifest["summary"]["quantized_layers"] == planned["plan"]["quantized_layers"]
    before = json.loads(ref["tree"]["qconvert.json"])
    assert planned["plan"]["quantized_layers"] < before["summary"]["quantized_layers"]


def test_a_killed_build_resumes(
    offline: Offline, reference: dict[str, Any], tmp_path: Path
) -> None:
    """kill -9 mid-target (a cancelled CI job): the rerun resumes from the finished shards."""
    total = reference["calls"]
    out = tmp_path / "out"
    args = [str(offline.spec), str(total * 2 // 3), str(out)]
    proc = subprocess.run([sys.executable, "-c", KILL, *args], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = out / "tiny-flux-mxfp8"
    partial = [p for p in state.iterdir() if p.name.endswith(".qconvert-partial")]
    assert len(partial) == 1 and (state / "build.json").is_file()
    assert json.loads((partial[0] / "progress.json").read_text())["done"]
    code, resumed = offline.run(out)
    assert code == 0 and resumed["status"] == "built" and resumed["resumed"]
    assert len(offline.calls) < total
    assert resumed["fingerprint"] == reference["fingerprint"]
    assert tree(state / "output") == reference["tree"]


def test_dry_run_writes_nothing(tiny_flux: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'[[target]]\nfamily = "flux"\nsource = "{tiny_flux}"\n'
        'formats = ["nvfp4", "fp8"]\nrepo = "alice/{name}-{format}"\n'
    )
    result = CliRunner().invoke(main, ["build", str(spec), "--dry-run", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    plan = plan_target("flux", FORMATS["nvfp4"], selection_for(), source=str(tiny_flux)).summary()
    assert lines[0] == (  # what `qconvert plan` says for the same source and format
        f"tiny-flux-nvfp4: would build: {plan['quantized_layers']}/{plan['linear_layers']} "
        f"Linear layers quantized, size {plan['size_ratio']:.3f}× bf16 → alice/tiny-flux-nvfp4"
    )
    assert lines[-1] == f"{spec}: 2 would build"
    assert not (tmp_path / "o").exists()


def test_output_is_the_convert_output_plus_the_build_key(
    tiny_flux: Path, converted: dict[str, Path], tmp_path: Path
) -> None:
    """A build's output is what `convert` writes for the same inputs; only the manifest's
    "build" key and "command" (the equivalent convert command) and the card's repo id differ.
    eval / bench in the spec are skipped in one line each where there is no CUDA GPU."""
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'[[target]]\nfamily = "flux"\nsource = "{tiny_flux}"\nformats = ["fp8"]\n'
        'repo = "alice/{name}-{format}"\nmax-shard-size = 10_000_000\n'
        'eval = { num-prompts = 1, lpips = "off" }\nbench = { batch = [1, 4], compile = true }\n'
    )
    args = ["build", str(spec), "-q", "--json", "-o", str(tmp_path / "b")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["targets"][0]["notes"] == [
        "eval skipped: no CUDA GPU here",
        "bench skipped: no CUDA GPU here",
    ]
    assert _flags({"num-prompts": 32, "batch": [1, 4], "compile": True, "no-load": False}) == [
        "--num-prompts",
        "32",
        "--batch",
        "1,4",
        "--compile",
    ]
    built = tree(tmp_path / "b" / "tiny-flux-fp8" / "output")
    plain = tree(converted["fp8"])
    assert sorted(built) == sorted(plain)
    assert sorted(k for k in built if built[k] != plain[k]) == ["README.md", "qconvert.json"]
    a, b = json.loads(built["qconvert.json"]), json.loads(plain["qconvert.json"])
    assert "build" not in b
    assert a["command"] == (
        f"qconvert flux --format fp8 --source {tiny_flux} --max-shard-size 10000000"
    )
    drop = ("build", "command")
    assert {k: v for k, v in a.items() if k not in drop} == {
        k: v for k, v in b.items() if k not in drop
    }
    assert 'from_pretrained("alice/tiny-flux-fp8"' in built["README.md"].decode()
