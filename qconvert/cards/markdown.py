"""Escaping for what a card shows but qconvert did not write: manifest strings (paths, repo ids,
patterns, reasons, the command), measurement files, the base model's card metadata.

Each helper returns text that renders as itself and cannot open structure of its own (a link,
an image, HTML, a heading, a list, a table cell or a code fence), and is the identity on the
plain text qconvert writes itself (so normal cards stay byte for byte what they were).
"""

from __future__ import annotations

import re
from urllib.parse import quote

_TAG = re.compile(r"<(?=[A-Za-z/!?])")  # what could open HTML, a comment or an autolink
_BLOCK_START = re.compile(r"^(\d*)([#>*+=|`~.)-])")
_URL = re.compile(r"^https?://[^\s<>()\[\]`'\"\\]+$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
_LICENSE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def one_line(value: object) -> str:
    text = "" if value is None else str(value)
    return re.sub(r"[\r\n\t\f\v]+", " ", text)


def text(value: object) -> str:
    """Inline text: backslashes and brackets escaped, no HTML, one line."""
    out = one_line(value).replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    return _TAG.sub("&lt;", out)


def paragraph(value: object) -> str:
    """``text`` for the start of a line: a leading block marker is escaped too."""
    out = text(value).lstrip()
    match = _BLOCK_START.match(out)
    if match and (match.group(1) == "" or match.group(2) in ".)"):
        return f"{match.group(1)}\\{out[len(match.group(1)) :]}"
    return out


def cell(value: object) -> str:
    """``text`` for a table cell (pipes escaped)."""
    return text(value).replace("|", "\\|")


def code(value: object) -> str:
    """An inline code span holding ``value`` exactly (one line), whatever backticks it has."""
    body = one_line(value)
    runs = [len(r) for r in re.findall(r"`+", body)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if body.startswith("`") or body.endswith("`") else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def code_cell(value: object) -> str:
    return code(value).replace("|", "\\|")


def fence(value: str) -> str:
    """A code fence longer than any backtick run in ``value`` (at least ```)."""
    runs = [len(r) for r in re.findall(r"`+", value)]
    return "`" * max(3, max(runs, default=0) + 1)


def url(value: object) -> str | None:
    """An http(s) URL that a markdown link can hold as is, else None."""
    return str(value) if isinstance(value, str) and _URL.match(value) else None


def relative_link(path: str) -> str:
    """A link target for a file of the repo itself."""
    return quote(path, safe="/._-~")


def version(value: object) -> str | None:
    return str(value) if isinstance(value, str) and _VERSION.match(value) else None


def license_id(value: object) -> str | None:
    return value if isinstance(value, str) and _LICENSE_ID.match(value) else None
