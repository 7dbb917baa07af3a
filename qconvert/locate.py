"""Where a source or checkpoint string points, decided before any network access: an existing
local path, else a Hub repo id when the string is one (``ORG/NAME``), else "no such folder".
The Hub lookup that may follow turns offline and not-found into one line (``hub_lookup``).
Used by ``convert`` (sources) and ``loaders`` (checkpoints); imports nothing else of qconvert
but ``errors``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qconvert.errors import QconvertError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OFFLINE = ("OfflineModeIsEnabled", "TransportError", "ConnectionError", "TimeoutError")


class NotFoundError(QconvertError, ValueError):
    """No such folder, and (for a repo id) no such Hub repo, or the Hub cannot be reached."""


def looks_like_repo_id(text: str) -> bool:
    """``ORG/NAME`` with the Hub's characters, and no such local path."""
    return bool(_REPO_ID.match(text)) and not Path(text).exists()


def local_or_repo(text: str | Path) -> Path | str:
    """An existing local path (as a Path), or a Hub repo id (as a str); NotFoundError "no such
    folder" for anything else."""
    if isinstance(text, str) and looks_like_repo_id(text):
        return text
    path = Path(text)
    if not path.exists():
        raise NotFoundError(f"{text}: no such folder")
    return path


def _cause(error: BaseException, names: tuple[str, ...]) -> BaseException | None:
    """The first exception in ``error``'s cause chain whose class (or a base) has one of
    ``names`` (huggingface_hub's and its HTTP client's errors, without importing them)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(c.__name__ in names for c in type(current).__mro__):
            return current
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def hub_lookup(repo_id: str | Path) -> Iterator[None]:
    """Around the Hub calls for ``repo_id`` (tried because no such folder exists): offline and
    repo-not-found become one-line NotFoundErrors; qconvert's own errors and others pass.
    Nothing is changed for a local path (``local_or_repo`` gave a Path)."""
    if isinstance(repo_id, Path):
        yield
        return
    try:
        yield
    except QconvertError:
        raise
    except Exception as e:
        offline = _cause(e, _OFFLINE)
        if offline is not None:
            why = (
                "HF_HUB_OFFLINE is set"
                if type(offline).__name__ == "OfflineModeIsEnabled"
                else f"the Hub is unreachable: {str(offline).strip() or type(offline).__name__}"
            )
            raise NotFoundError(
                f"{repo_id}: no such folder, and it cannot be looked up as a Hub repo offline "
                f"({why})"
            ) from None
        if _cause(e, ("RepositoryNotFoundError",)) is not None:
            raise NotFoundError(
                f"{repo_id}: no such folder, and repo not found on the Hub (or private: log in "
                f"with `hf auth login`)"
            ) from None
        raise
