"""The one containment rule for paths read from untrusted input (a source, a manifest, a Hub
repo): every path resolves inside its root.

A path given by such input (a shard index's ``weight_map`` value, a ``model_index.json`` key, a
manifest's ``files`` entry, a file found in a component folder) must be a plain relative path: no
absolute path, no ``..``, no empty or odd component, and no symbolic link on the way. The one
kind of link allowed is the Hugging Face cache's: a file of ``models--ORG--NAME/snapshots/SHA/``
that links to ``models--ORG--NAME/blobs/`` of the same repo. Anything else is refused with one
line naming the entry (``ContainmentError``). Component names from ``model_index.json`` are, as
diffusers expects, single plain folder names (Python identifiers).

This module imports nothing of qconvert but ``errors``, so every part may use it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from qconvert.errors import QconvertError

__all__ = ["ContainmentError", "component_name", "files_under", "inside", "is_plain"]


class ContainmentError(QconvertError, ValueError):
    """A path from a source or a manifest that leaves its root; the message names the entry."""


def _problem(entry: object) -> str | None:
    """Why ``entry`` is not a plain relative POSIX path, or None."""
    if not isinstance(entry, str):
        return f"is a {type(entry).__name__}, not a path"
    if not entry:
        return "is empty"
    if "\0" in entry or "\\" in entry or any(ord(c) < 32 for c in entry):
        return "holds a backslash or a control character"
    if entry.startswith("/"):
        return "is an absolute path"
    if any(part in ("..", "") for part in entry.split("/") if part != "."):
        return "climbs out with '..'" if ".." in entry.split("/") else "has an empty part"
    if entry.endswith("/"):
        return "names a folder"
    return None


def is_plain(entry: object) -> bool:
    return _problem(entry) is None


def _hub_blobs(root: Path) -> Path | None:
    """``…/models--ORG--NAME/blobs`` when ``root`` (resolved) lies in a Hugging Face cache
    snapshot, else None."""
    for p in (root, *root.parents):
        repo = p.parent.parent
        if p.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--")):
            return repo / "blobs"
    return None


def inside(root: Path, entry: str, what: str) -> Path:
    """``root / entry`` after checking that it stays inside ``root``; ContainmentError naming
    ``what`` (e.g. "model.json: weight_map entry") otherwise. The path need not exist."""
    problem = _problem(entry)
    if problem:
        raise ContainmentError(
            f"{what} {entry!r} {problem}; refusing it: a source or output may only name files "
            f"inside its own folder"
        )
    real_root = root.resolve()
    blobs = _hub_blobs(real_root)
    parts = PurePosixPath(entry).parts
    current = real_root
    for i, part in enumerate(parts):
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            break  # nothing there (yet): the caller says what is missing
        except OSError as e:
            raise ContainmentError(f"{what} {entry!r}: cannot be read ({e.strerror})") from None
        if stat.S_ISLNK(mode):
            target = current.resolve()
            if i == len(parts) - 1 and blobs is not None and target.parent == blobs.resolve():
                break  # the Hugging Face cache's snapshot → blob link of this repo
            raise ContainmentError(
                f"{what} {entry!r} is a symbolic link (to {target}); refusing to follow it: "
                f"copy the files into the folder instead"
            )
    return root / Path(*parts)


def component_name(name: object, where: str) -> str:
    """A pipeline component's folder name from ``model_index.json``: one plain folder name."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ContainmentError(
            f"{where}: component {name!r} is not a plain folder name (diffusers component "
            f"names are identifiers like text_encoder_2); refusing it"
        )
    return name


def files_under(root: Path, folder: str, what: str) -> Iterator[str]:
    """Every file under ``root/folder`` as a path relative to ``root`` (sorted, each checked
    with ``inside``; links out of it and linked folders are refused, never followed)."""
    top = inside(root, folder, what)
    if not top.is_dir():
        return
    found: list[str] = []
    for current, dirs, files in os.walk(top, followlinks=False):
        rel = Path(current).relative_to(root).as_posix()
        for name in dirs:
            inside(root, f"{rel}/{name}", what)  # a linked folder is refused here
        found += [f"{rel}/{name}" for name in files]
        dirs.sort()
    for rel in sorted(found):
        path = inside(root, rel, what)
        if path.is_file():
            yield rel
