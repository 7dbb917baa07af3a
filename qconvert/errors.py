"""The one error type users see.

Every failure a user can cause (a bad source, option, recipe, manifest, token, disk) raises a
subclass of :class:`QconvertError` whose message is one line naming the file, key or option
and what to do. The CLI prints those as one line and exits 1 (130 after Ctrl-C); anything else
is a bug and keeps its traceback. Each part defines its own subclass next to the code that raises it
(``SourceError`` in ``convert.source``, ``PushError`` in ``hub``, …); this module imports
nothing, so every part may use it.
"""

from __future__ import annotations


class QconvertError(Exception):
    """A failure the user can fix; ``str(error)`` is the whole message, one line. The CLI exits
    with ``exit_code`` (130 for an interruption, as shells expect after Ctrl-C)."""

    exit_code = 1


class ManifestError(QconvertError, ValueError):
    """A folder that is not a qconvert output, or whose files differ from its manifest."""


class UsageError(QconvertError, ValueError):
    """An option value that cannot work here (e.g. --device cuda on a machine without CUDA)."""
