"""The output transaction: a hidden work directory beside the output, resume state, and the
final rename. Nothing looks complete until ``replace`` renames the work directory into place."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from qconvert.convert.plan import Plan
from qconvert.convert.source import Source
from qconvert.convert.writer import PROGRESS, Progress, finished_shards, plan_digest
from qconvert.errors import QconvertError
from qconvert.sizes import human_size

log = logging.getLogger("qconvert")


class OutputError(QconvertError, ValueError):
    """The output path cannot be written as asked."""


class Interrupted(QconvertError):
    """Ctrl-C during a conversion; the message says what was kept and how to resume."""

    exit_code = 130


def work_dir(output: Path, overwrite: bool, resume: bool) -> Path:
    """The work directory for ``output`` (checked, not created)."""
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: already exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.qconvert-partial"
    if work.exists() and not resume:
        raise OutputError(
            f"{work}: work directory of an interrupted run; re-run with --resume to continue it, "
            f"or delete it"
        )
    return work


def stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def fingerprint(plan: Plan, source: Source, fmt: str, transformer_only: bool) -> dict[str, object]:
    """What a resumed run must share with the interrupted one."""
    from qconvert import __version__

    described = {k: v for k, v in source.description.items() if k != "path"}
    shards: list[object] = [[h.path.name, h.path.stat().st_size] for h in source.shards]
    if source.description.get("kind") == "local":
        described["path"] = source.description["path"]
        shards = [[h.path.name, *stamp(h.path)] for h in source.shards]
    return {
        "qconvert": __version__,
        "source": {**described, "shards": shards},
        "format": fmt,
        "plan": plan_digest(plan),
        "transformer_only": transformer_only,
    }


_WHAT = {
    "source": "source (or its files changed)",
    "format": "format",
    "plan": "recipe or options",
    "qconvert": "qconvert version",
    "transformer_only": "--transformer-only setting",
}


def resume_state(work: Path, fingerprint: dict[str, object], dst: Path) -> Progress:
    """The interrupted run's progress (its finished shards re-checked), or a fresh one."""
    state = Progress.load(work / PROGRESS) if work.exists() else None
    if state is None:
        return Progress(work / PROGRESS, fingerprint, {})
    differs = [_WHAT[k] for k in fingerprint if state.fingerprint.get(k) != fingerprint[k]]
    if differs:
        raise OutputError(
            f"--resume: {work} holds an interrupted run with a different {', '.join(differs)}; "
            f"delete it or re-run the original command"
        )
    done = finished_shards(state, dst)
    state.done = {k: v for k, v in state.done.items() if k in done}
    log.warning("qconvert: resuming: %d finished shard(s) reused from %s", len(done), work)
    return state


def check_space(where: Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    if needed > free:
        raise OutputError(
            f"{where}: not enough disk space: the output needs {human_size(needed)}, "
            f"{human_size(free)} free; free space or write elsewhere with -o"
        )


def replace(work: Path, output: Path) -> None:
    """Rename the finished work directory into place (replacing a previous output)."""
    if output.exists():
        old = output.parent / f".{output.name}.qconvert-old"
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
        work.rename(output)
        shutil.rmtree(old)
    else:
        work.rename(output)
