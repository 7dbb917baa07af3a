"""The base model of a conversion: the Hub repo (and revision) the source's bf16 weights are.

A Hub source is its own base. A local folder is recognized from what it really holds:

- a folder of the Hugging Face cache (``…/models--ORG--NAME/snapshots/COMMIT``): repo and commit
  are in its path;
- a ``hf download REPO --local-dir DIR`` folder: huggingface_hub writes one
  ``DIR/.cache/huggingface/download/<file>.metadata`` per downloaded file holding the commit, the
  file's etag and a timestamp (``huggingface_hub/_local_folder.py``, 2.4) — the commit, but not
  the repo id. qconvert takes the commit when every file the conversion reads has fresh metadata
  (not modified since the download) and they agree on it, and asks for ``--base-model REPO``.

``--base-model REPO[@REVISION]`` sets or overrides the base for any source. The manifest
records it as ``source.base_model`` with where it came from (``from``): ``hub cache path``,
``local-dir metadata`` or ``flag``. Nothing is recorded when there is nothing to say, so plain
runs write the manifest they always did.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from qconvert import manifest as mf
from qconvert.cards.base import HUB_CACHE_PATH
from qconvert.convert.source import Source
from qconvert.errors import QconvertError

log = logging.getLogger("qconvert")
FLAG = "flag"
CACHE_PATH = "hub cache path"
LOCAL_DIR = "local-dir metadata"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_METADATA = Path(".cache") / "huggingface" / "download"


class BaseModelError(QconvertError, ValueError):
    """A --base-model value that cannot be used, or an output whose base cannot be set."""


def parse(text: str) -> tuple[str, str | None]:
    """``REPO[@REVISION]`` → (repo id, revision or None); the error says what is wrong."""
    from qconvert.hub import PushError, validate_repo_id

    repo, sep, revision = text.strip().partition("@")
    if sep and not revision.strip():
        raise BaseModelError(f"--base-model {text!r}: empty revision after '@'")
    if sep and not re.fullmatch(r"[^\s`]+", revision.strip()):
        raise BaseModelError(
            f"--base-model {text!r}: revision {revision.strip()!r} is not a branch, tag or commit"
        )
    try:
        validate_repo_id(repo)
    except PushError as e:
        raise BaseModelError(f"--base-model {text!r}: {e}") from None
    return repo, revision.strip() or None


def from_flag(text: str, commit: str | None = None) -> dict[str, Any]:
    """The manifest record for ``--base-model``; ``commit`` (from the folder) when the flag
    names no revision."""
    repo, revision = parse(text)
    record: dict[str, Any] = {"repo_id": repo, "revision": revision, "from": FLAG}
    if revision and _COMMIT.match(revision):
        record["commit"] = revision
    elif commit and revision is None:
        record["commit"] = commit
        record["commit_from"] = LOCAL_DIR
    return record


def _read_metadata(path: Path) -> tuple[str, float] | None:
    """(commit, timestamp) of one huggingface_hub download-metadata file, None if unreadable."""
    try:
        commit, _etag, timestamp = path.read_text(encoding="utf-8").splitlines()[:3]
        return commit.strip(), float(timestamp)
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def local_dir_commit(folder: Path, files: list[Path]) -> str | None:
    """The commit a ``hf download --local-dir`` folder was downloaded at, when every one of
    ``files`` (those the conversion reads) has metadata, was not modified since (huggingface_hub's
    own rule: mtime within 1 s of the metadata's timestamp), and all name the same commit."""
    for root in (folder, folder.parent):  # a transformer folder inside a pipeline download
        meta_dir = root / _METADATA
        if not meta_dir.is_dir():
            continue
        commits = set()
        for file in files:
            try:
                rel = file.resolve().relative_to(root.resolve())
            except ValueError:
                return None
            found = _read_metadata(meta_dir / f"{os.path.join(*rel.parts)}.metadata")
            if found is None or not _COMMIT.match(found[0]):
                return None
            commit, timestamp = found
            if file.stat().st_mtime - 1 > timestamp:
                return None  # changed after the download: no longer that commit's file
            commits.add(commit)
        return commits.pop() if len(commits) == 1 else None
    return None


def resolve(source: Source, flag: str | None) -> dict[str, Any] | None:
    """What the manifest records as ``source.base_model`` (None: nothing beyond the source)."""
    kind = source.description.get("kind")
    if kind == "tiny":
        if flag:
            raise BaseModelError("--base-model: a --tiny build has no base model")
        return None
    if kind != "local":  # a Hub source is its own base
        return from_flag(flag) if flag else None
    path = str(source.description.get("path", ""))
    cached = HUB_CACHE_PATH.search(path)
    files = [h.path for h in source.shards] + [source.transformer_dir / "config.json"]
    commit = None if cached else local_dir_commit(source.root, files)
    if flag:
        return from_flag(flag, commit)
    if cached:
        repo = f"{cached['org']}/{cached['name']}"
        return {"repo_id": repo, "commit": cached["sha"], "from": CACHE_PATH}
    if commit:
        log.warning(
            "qconvert: %s was downloaded with `hf download --local-dir` at commit %s; its "
            "metadata does not name the repo: pass --base-model REPO to name the base model",
            source.root,
            commit[:12],
        )
        return {"repo_id": None, "commit": commit, "from": LOCAL_DIR}
    return None


def set_base_model(output_dir: str | Path, text: str) -> dict[str, Any]:
    """Record ``--base-model`` in an existing output's manifest (written to a temp file, then
    renamed); the caller re-renders the card. Returns the record."""
    root = Path(output_dir)
    data = mf.load(root)
    source = data.get("source")
    if not isinstance(source, dict):
        raise BaseModelError(f"{root / mf.MANIFEST}: no source record; re-convert")
    if source.get("kind") == "tiny":
        raise BaseModelError(f"{root}: a --tiny build has no base model")
    previous = source.get("base_model")
    commit = previous.get("commit") if isinstance(previous, dict) else None
    if isinstance(previous, dict) and previous.get("from") != LOCAL_DIR:
        commit = None  # another base's commit says nothing about this one
    source["base_model"] = record = from_flag(text, commit)
    target = root / mf.MANIFEST
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(mf.dumps(data), encoding="utf-8")
    os.replace(tmp, target)
    return record


__all__ = ["BaseModelError", "from_flag", "local_dir_commit", "parse", "resolve", "set_base_model"]
