"""Byte sizes as people write them: ``5GB``, ``4.5GiB``, ``500MB`` or plain bytes."""

from __future__ import annotations

import math
import re

from prewarm.errors import UsageError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units, as transformers uses), ``"1GiB"`` -> 2**30."""
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise UsageError(
            f"invalid size {text!r}",
            hint="write a number of bytes or a number with a unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB",
        )
    value = math.floor(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"size {text!r} must be more than zero bytes")
    return value


def format_size(n: int | float) -> str:
    """Human-readable bytes with decimal units (GB as disks and the hub count them)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
