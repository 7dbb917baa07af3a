"""A newcomer's first minutes: the README quickstart and the Python API print only qconvert's
own lines; the "load it with" hint fits the machine and runs as printed; plans read at a glance;
a missing path says "no such folder" before any Hub lookup (and offline says so in one line);
Ctrl-C exits 130; a re-push prints qconvert's line only; messages name no temporary folder.

The Hub parts run the real huggingface_hub client against the loopback Hub (tests/hubserver.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from hubserver import HubServer, client_env

from qconvert.cli import main
from qconvert.cli.convert import load_hint
from qconvert.convert import writer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_newcomer_token"


def python(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run a fresh interpreter (as a user would, -W default: every warning once) on a script."""
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env or {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        cwd=cwd,
        check=False,
    )


def lines(text: str) -> list[str]:
    return [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]


def test_python_api_is_quiet(converted: dict[str, Path]) -> None:
    """Importing the public API and loading a checkpoint prints qconvert's log line only: no
    torchao .so / triton notices, torch pytree enum warnings, diffusers' torchao-import probe,
    transformers' torchvision fallback. Other warnings of those loggers still show."""
    proc = python(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        import diffusers.utils.logging
        diffusers.utils.logging.disable_progress_bar()  # progress bars are the caller's choice
        import qconvert.convert
        from qconvert.loaders import load_pipeline
        pipe = load_pipeline(sys.argv[1], device="cpu")
        logging.getLogger("torchao").warning("torchao: an unrelated warning still shows")
        """,
        str(converted["nvfp4"]),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = lines(proc.stdout + proc.stderr)
    assert len(out) == 2, out
    assert out[0].startswith("qconvert: ") and "NVFP4Tensor weights on cpu" in out[0], out
    assert out[1] == "torchao: an unrelated warning still shows"


def test_readme_quickstart_prints_only_qconvert_lines_and_its_hint_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's quickstart command, as a user runs it; then every snippet of its "load it
    with" hint, executed as printed (on CPU: qconvert.loaders first)."""
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    command = quickstart.rsplit("&& ", 1)[1].split()
    assert command[:2] == ["qconvert", "flux"], quickstart
    proc = subprocess.run(
        [sys.executable, "-m", "qconvert", *command[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(ln.startswith("converting:") for ln in lines(proc.stderr)), proc.stderr[-3000:]
    out = lines(proc.stdout)
    assert out[0].startswith("wrote out/tiny-flux-nvfp4 (nvfp4; recipe flux)"), out
    assert out[1].startswith("load it with (qconvert.loaders picks what runs on CPU)"), out
    snippets = [ln.strip() for ln in out[2:] if ln.startswith("  ")]
    assert snippets[0].startswith("from qconvert.loaders import load_pipeline")
    assert "dtype=torch.bfloat16" in snippets[1] and snippets[1].startswith("import torch;")
    monkeypatch.chdir(tmp_path)
    for snippet in snippets:
        scope: dict[str, object] = {}
        exec(snippet, scope)  # runnable as printed
        assert type(scope["pipe"].transformer).__name__ == "FluxTransformer2DModel"


def test_hint_for_a_transformer_and_for_a_native_gpu(
    converted: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lone = Path(shutil.copytree(converted["mxfp8"] / "transformer", tmp_path / "t"))
    hint = load_hint(lone, ["mxfp8"])
    assert hint[0] == "load it with (qconvert.loaders picks what runs on CPU):"
    assert "runs it as saved only on NVIDIA Blackwell" in hint[2]
    for snippet in (hint[1].strip(), hint[3].strip()):
        scope: dict[str, object] = {}
        exec(snippet, scope)
        weight = scope["t"].transformer_blocks[0].attn.to_q.weight
        assert type(weight).__name__ == "MXTensor"
    from qconvert.loaders import runtime

    monkeypatch.setattr(runtime, "device_class", lambda device: "sm100")
    native = load_hint(converted["fp8"], ["fp8"])
    assert native[0].startswith("load it with (plain diffusers runs these weights as saved")
    assert "DiffusionPipeline.from_pretrained(" in native[1] and "bfloat16" in native[1]
    assert "load_pipeline(" in native[3]


def test_plan_collapses_repeated_blocks() -> None:
    def plan(*extra: str) -> list[str]:
        result = CliRunner().invoke(
            main, ["plan", "flux", "--format", "nvfp4", "--real-config", *extra]
        )
        assert result.exit_code == 0, result.output
        return result.output.splitlines()

    short = plan()
    assert any(
        re.search(r"single_transformer_blocks\.N\.proj_out .* ×38 +nvfp4$", ln) for ln in short
    )
    assert len(short) < 40 and "--all lists every layer" in short[1]
    every = plan("--all")
    rows = [ln for ln in every if ln.startswith("  ")]
    assert len(rows) == 504 and any("single_transformer_blocks.37.proj_out" in r for r in rows)
    data = json.loads("\n".join(plan("--json")))
    assert len(data["layers"]) == 504 and not any(".N." in x["name"] for x in data["layers"])


def test_missing_path_is_no_such_folder_before_any_hub_lookup(tmp_path: Path) -> None:
    """A string that cannot be a repo id is a missing folder, with no network call (the Hub
    endpoint here is a closed port); a valid repo id is tried on the Hub: offline and not
    found say so in one line."""
    with HubServer(tokens={TOKEN: "alice"}) as hub:
        env = client_env(hub, tmp_path / "home", TOKEN)
        proc = python(
            """
            import json
            from qconvert.loaders import load_pipeline, load_transformer
            from qconvert.convert import convert
            out = {}
            for name, call in [
                ("transformer", lambda: load_transformer("./typo/dir")),
                ("pipeline", lambda: load_pipeline("typo/dir/deeper")),
                ("repo", lambda: load_transformer("alice/nope")),
                ("convert", lambda: convert("o", family="flux", source="alice/nope")),
            ]:
                try:
                    call()
                except Exception as e:
                    out[name] = [type(e).__name__, str(e)]
            print("RESULT=" + json.dumps(out))
            """,
            env=env,
            cwd=tmp_path,
        )
        requests = list(hub.requests)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("RESULT=", 1)[1])
    assert got["transformer"] == ["NotFoundError", "./typo/dir: no such folder"]
    assert got["pipeline"] == ["NotFoundError", "typo/dir/deeper: no such folder"]
    assert got["repo"][1].startswith("alice/nope: no such folder, and repo not found on the Hub")
    assert got["convert"][1].startswith("alice/nope: no such folder, and repo not found")
    assert not any("typo" in r.path for r in requests)  # never asked the Hub about a path

    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home2")}
    proc = python(
        """
        import json
        from click.testing import CliRunner
        from qconvert.cli import main
        from qconvert.loaders import load_transformer
        run = CliRunner().invoke(main, ["flux", "--format", "nvfp4", "--source", "typo/dir"])
        try:
            load_transformer("typo/dir")
        except Exception as e:
            error = [type(e).__name__, str(e)]
        print("RESULT=" + json.dumps({"code": run.exit_code, "cli": run.output, "api": error}))
        """,
        env=offline,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc.stderr) == []
    got = json.loads(proc.stdout.split("RESULT=", 1)[1])
    cli = lines(got["cli"])
    assert got["code"] == 1 and len(cli) == 1 and cli[0].startswith("Error: typo/dir: ")
    assert "HF_HUB_OFFLINE" in cli[0]
    assert got["api"] == [
        "NotFoundError",
        "typo/dir: no such folder, and it cannot be looked up as a Hub repo offline "
        "(HF_HUB_OFFLINE is set)",
    ]


def test_ctrl_c_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_quantize", interrupted)
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["flux", "--format", "nvfp4", "--tiny", "-o", str(out), "-q"])
    assert result.exit_code == 130, result.output
    assert lines(result.output)[-1].startswith("Error: interrupted; ")

    monkeypatch.setattr("qconvert.convert.plan_target", interrupted)
    result = CliRunner().invoke(main, ["plan", "flux", "--format", "nvfp4", "--tiny"])
    assert (result.exit_code, lines(result.output)) == (130, ["interrupted"])


def test_messages_and_help(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["flux", "--format", "nvfp4", "--tiny", "--only", "zzz", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    message = lines(result.output)[-1]
    assert message.startswith("Error: the tiny flux build: no Linear layer would be quantized")
    assert "qconvert-tiny-" not in result.output and tempfile.gettempdir() not in message
    top = CliRunner().invoke(main, ["--help"]).output
    assert "FP8" in top and "NVFP4" in top and "MXFP8" in top
    description = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    assert "FP8 checkpoints" in description
    ltx2 = " ".join(CliRunner().invoke(main, ["ltx2", "--help"]).output.split())
    assert "a LTX-2" not in ltx2 and "of LTX-2 pipelines" in ltx2
    assert "memory use does not depend on it" in ltx2 and "bounds memory" not in ltx2


def test_repush_prints_only_qconvert_line(converted: dict[str, Path], tmp_path: Path) -> None:
    """huggingface_hub's "No files have been modified since last commit" does not precede
    qconvert's own "already has these files" on a re-push."""
    out = Path(shutil.copytree(converted["fp8"], tmp_path / "out"))
    with HubServer(tokens={TOKEN: "alice"}) as hub:
        env = client_env(hub, tmp_path / "home", TOKEN)
        push = [sys.executable, "-m", "qconvert", "push", str(out), "--repo-id", "alice/x", "-q"]
        first = subprocess.run(push, capture_output=True, text=True, env=env, timeout=300)
        again = subprocess.run(push, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0 and again.returncode == 0, again.stderr[-3000:]
    assert "No files have been modified" not in again.stderr + again.stdout
    assert lines(again.stderr) == []
    assert lines(again.stdout)[0].endswith("already has these files; nothing to push")
