"""Resume and disk-full behaviour: an interrupted conversion (Ctrl-C, kill -9, disk full) keeps
its finished shards; --resume re-checks their hashes, redoes the rest, and ends byte-identical
to an uninterrupted run; a resume against other inputs is refused, saying what differs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qconvert.convert import Interrupted, OutputError, convert, writer
from qconvert.safetensors_io import ShardWriter
from qconvert.tiny.synthetic import write_flux_source

SHARD = 8 * 10**6


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def run(source: Path, out: Path, **kw: object) -> Path:
    options = {"fmt": "mxfp8", "max_shard_size": SHARD, "progress": False, "command": "test"}
    return convert(out, source=source, **{**options, **kw}).output  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "src"
    write_flux_source(path, num_layers=1, num_single_layers=2)
    return path


@pytest.fixture(scope="module")
def reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return tree(run(source, tmp_path_factory.mktemp("ref") / "out"))


def interrupt_at(monkeypatch: pytest.MonkeyPatch, n: int, error: BaseException) -> None:
    calls = []
    real = writer._quantize

    def failing(*args: object) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "_quantize", failing)


def test_ctrl_c_then_resume_is_byte_identical(source: Path, reference: dict[str, bytes],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    interrupt_at(monkeypatch, 60, KeyboardInterrupt())
    with pytest.raises(Interrupted, match=r"finished shard\(s\) kept in .*re-run with --resume"):
        run(source, out)
    monkeypatch.undo()
    work = tmp_path / ".out.qconvert-partial"
    done = json.loads((work / "progress.json").read_text())["done"]
    assert 1 <= len(done) and not out.exists()
    with pytest.raises(OutputError, match="re-run with --resume to continue it"):
        run(source, out)
    # A damaged finished shard is not trusted: it is redone.
    first = sorted(done)[0]
    (work / "transformer" / first).write_bytes(b"garbage")
    reads = []
    real_read = writer.read_tensor
    monkeypatch.setattr(writer, "read_tensor", lambda *a: reads.append(1) or real_read(*a))
    run(source, out, resume=True)
    assert tree(out) == reference
    total = sum(len(json.loads(p.read_text())["weight_map"]) for p in
                out.glob("transformer/*.index.json"))
    assert 0 < len(reads) < total  # only the unfinished shards were read again


def test_kill_9_then_resume_is_byte_identical(source: Path, reference: dict[str, bytes],
                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "from qconvert.convert import convert, writer\n"
        "real = writer._quantize\n"
        "def slow(*a):\n"
        "    time.sleep(0.05)\n"
        "    return real(*a)\n"
        "writer._quantize = slow\n"
        f"convert(sys.argv[1], source=sys.argv[2], fmt='mxfp8', max_shard_size={SHARD},"
        " progress=False, command='test')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(out), str(source)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / ".out.qconvert-partial" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text())["done"]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the conversion ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    run(source, out, resume=True)
    assert tree(out) == reference


def test_resume_refuses_other_inputs(source: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    interrupt_at(monkeypatch, 60, KeyboardInterrupt())
    with pytest.raises(Interrupted):
        run(source, out)
    monkeypatch.undo()
    with pytest.raises(OutputError, match="with a different format"):
        run(source, out, fmt="nvfp4", resume=True)
    with pytest.raises(OutputError, match="with a different recipe or options"):
        run(source, out, skips=("proj_mlp",), resume=True)
    other = tmp_path / "other"
    shutil.copytree(source, other)
    with pytest.raises(OutputError, match="with a different source"):
        run(other, out, resume=True)


def test_not_enough_space_is_refused_before_writing(source: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: type(usage)(usage.total, usage.total - 2**20, 2**20))
    with pytest.raises(OutputError, match=r"not enough disk space: the output needs .* MiB, "
                                          r"1\.0 MiB free"):
        run(source, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_midway_names_the_path_and_resumes(source: Path, reference: dict[str, bytes],
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_put = ShardWriter.put

    def put(self: ShardWriter, name: str, tensor: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == 100:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real_put(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "put", put)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"\.safetensors: disk full .* needed for the rest\); "
                                          r"free space, then .*re-run with --resume"):
        run(source, out)
    assert not out.exists()
    monkeypatch.undo()
    run(source, out, resume=True)
    assert tree(out) == reference
