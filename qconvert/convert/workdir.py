"""The output transaction: a lock, a hidden work directory beside the output, resume state, and
the final rename. Nothing looks complete until ``replace`` renames the work directory into place.

- ``locked(output)`` holds ``.<name>.qconvert-lock`` beside the output (``fcntl.flock``) for the
  whole run: a second run into the same output is refused, naming the first one's pid. Parent
  folders the run had to create are removed again when it leaves nothing in them.
- ``work_dir`` refuses an existing output unless ``--overwrite``, and ``--overwrite`` only ever
  replaces a previous qconvert output (a folder holding our manifest) or an empty folder;
  ``check_apart`` refuses an output that is the source, holds it or lies inside it.
- ``resume_state`` reuses an interrupted run's finished shards only when they still have their
  recorded sha256, and clears everything else out of the work directory (nothing unknown is
  carried into the output). Whether the source is still the one those shards came from is
  checked by size + mtime here (the fingerprint), and by sha256 when the resumed run has hashed
  the source (``Progress.sources``; the converter compares them before finishing).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from qconvert.convert.plan import Plan
from qconvert.convert.source import Source
from qconvert.convert.writer import PROGRESS, Progress, finished_shards, plan_digest
from qconvert.errors import QconvertError
from qconvert.manifest import MANIFEST
from qconvert.sizes import human_size

log = logging.getLogger("qconvert")


class OutputError(QconvertError, ValueError):
    """The output path cannot be written as asked."""


class Interrupted(QconvertError):
    """Ctrl-C during a conversion; the message says what was kept and how to resume."""

    exit_code = 130


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, deepest first."""
    created = []
    current = folder.absolute()
    while not current.exists() and current != current.parent:
        created.append(current)
        current = current.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the output's folder ({e.strerror})") from None
    return created


def _lock_file(output: Path) -> Path:
    return output.parent / f".{output.name}.qconvert-lock"


def _acquire(path: Path, output: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise OutputError(
                f"{path}: cannot create the output's lock file ({e.strerror}); write the output "
                f"somewhere you can write to"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"{output}: another qconvert (pid {pid}) is writing this output; wait for it to "
                f"finish (or stop it), then re-run"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder we waited for removed the file: lock the new one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def locked(output: Path) -> Iterator[None]:
    """Hold the output's lock for the run; remove the folders it created if it leaves them
    empty (a failed run leaves no empty parents behind)."""
    created = _make_parents(output.parent)
    path = _lock_file(output)
    try:
        fd = _acquire(path, output)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (the output, or kept shards), or gone


def _ours(output: Path) -> bool:
    """A previous qconvert output (our manifest at its top) or an empty folder."""
    if output.is_symlink() or not output.is_dir():
        return False
    if not any(output.iterdir()):
        return True
    try:
        data = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("tool") == "qconvert"


def work_dir(output: Path, overwrite: bool, resume: bool) -> Path:
    """The work directory for ``output`` (checked, not created)."""
    if output.is_symlink():
        raise OutputError(f"{output}: is a symbolic link; write the output to a real path")
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: already exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a directory")
    if output.exists() and not _ours(output):
        raise OutputError(
            f"{output}: not a qconvert output (no {MANIFEST}); --overwrite only replaces a "
            f"previous qconvert output: delete the folder yourself or choose another -o"
        )
    work = output.parent / f".{output.name}.qconvert-partial"
    if work.exists() and not resume:
        raise OutputError(
            f"{work}: work directory of an interrupted run; re-run with --resume to continue it, "
            f"or delete it"
        )
    return work


def check_apart(output: Path, source: Path) -> None:
    """Refuse an output that is the source, contains it, or lies inside it."""
    out, src = output.resolve(), source.resolve()
    if out == src or src.is_relative_to(out):
        raise OutputError(
            f"{output}: is (or contains) the source {source}; writing there would destroy it: "
            f"choose another -o"
        )
    if out.is_relative_to(src):
        raise OutputError(
            f"{output}: lies inside the source {source}; write the output outside the source"
        )


def stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def shard_rel(source: Source, path: Path) -> str:
    return path.relative_to(source.root).as_posix()


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


def resume_state(
    work: Path, fingerprint: dict[str, object], dst: Path, names: list[str], sources: list[str]
) -> Progress:
    """The interrupted run's progress (its finished shards re-checked), or a fresh one.

    ``names`` are this plan's output shard names, ``sources`` the source shards (relative
    paths) whose sha256 the interrupted run must have recorded for its shards to be reused.
    Everything else in the work directory is removed."""
    try:
        state = Progress.load(work / PROGRESS) if work.exists() else None
    except ValueError as e:
        raise OutputError(
            f"{work / PROGRESS}: not a qconvert progress file ({e}); delete {work} and re-run "
            f"without --resume"
        ) from None
    if state is None:
        state = Progress(work / PROGRESS, fingerprint, {})
    else:
        differs = [_WHAT[k] for k in fingerprint if state.fingerprint.get(k) != fingerprint[k]]
        if differs:
            raise OutputError(
                f"--resume: {work} holds an interrupted run with a different "
                f"{', '.join(differs)}; delete it or re-run the original command"
            )
        done = finished_shards(state, dst, names)
        if done and not all(rel in state.sources for rel in sources):
            log.warning(
                "qconvert: resuming: the interrupted run had not hashed its source yet, so its "
                "%d finished shard(s) cannot be proven current; redoing them",
                len(done),
            )
            done = set()
        state.done = {k: v for k, v in state.done.items() if k in done}
        state.sources = {k: v for k, v in state.sources.items() if k in sources}
        log.warning("qconvert: resuming: %d finished shard(s) reused from %s", len(done), work)
    if work.exists():
        _clear(work, {work / PROGRESS, *(dst / name for name in state.done)})
    return state


def _clear(work: Path, keep: set[Path]) -> None:
    """Remove everything under ``work`` but ``keep`` (links are removed, never followed)."""
    for current, dirs, files in os.walk(work, topdown=False, followlinks=False):
        here = Path(current)
        for name in files:
            if here / name not in keep:
                (here / name).unlink()
        for name in dirs:
            path = here / name
            if path.is_symlink():
                path.unlink()
            else:
                with contextlib.suppress(OSError):
                    path.rmdir()  # kept when it still holds a kept shard


def check_space(where: Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    if needed > free:
        raise OutputError(
            f"{where}: not enough disk space: the output needs {human_size(needed)}, "
            f"{human_size(free)} free; free space or write elsewhere with -o"
        )


def replace(work: Path, output: Path) -> None:
    """Rename the finished work directory into place (replacing a previous output, which
    ``work_dir`` checked is ours, under the lock)."""
    if output.exists():
        old = output.parent / f".{output.name}.qconvert-old"
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
        work.rename(output)
        shutil.rmtree(old)
    else:
        work.rename(output)


__all__ = [
    "Interrupted",
    "OutputError",
    "check_apart",
    "check_space",
    "fingerprint",
    "locked",
    "replace",
    "resume_state",
    "shard_rel",
    "stamp",
    "work_dir",
]
