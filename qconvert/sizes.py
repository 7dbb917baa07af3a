"""Byte counts: how they are shown to people (CLI, plan, inspect, errors, cards) and read from
them (``--max-shard-size 5GB``)."""

from __future__ import annotations

import re

from qconvert.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS |= {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def human_size(n: int) -> str:
    """1536 → '1.5 KiB', 5·2³⁰ → '5.00 GiB'."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"


def parse_size(text: str) -> int:
    """'5GB' → 5e9, '500MiB' → 500·2²⁰, '1000' → 1000 bytes."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{text!r} is not a size; use e.g. 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "").upper().removesuffix("B")
    return int(float(m.group(1)) * _UNITS[unit])
