"""The one error type of ``qconvert.evaluate``: a bad input the user can fix."""

from __future__ import annotations

from qconvert.errors import QconvertError


class EvalError(QconvertError, ValueError):
    """A measurement that cannot run as asked; the message names the file or option and what
    to do."""
