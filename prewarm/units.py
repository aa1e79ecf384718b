"""Byte sizes as people write them: ``5GB``, ``4.5GiB``, ``500MB`` or plain bytes."""

from __future__ import annotations

import re
from decimal import Decimal

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
MAX_SIZE = 2**63 - 1  # off_t
_SIZE = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*([a-zA-Z]*)\s*$", re.ASCII)


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units, as transformers uses), ``"1GiB"`` -> 2**30."""
    shown = text if len(text) <= 40 else text[:37] + "..."
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise UsageError(
            f"invalid size {shown!r}",
            hint="write a number of bytes or a number with a unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB",
        )
    value = int(Decimal(match.group(1)) * _UNITS[unit])  # exact: no float overflow or rounding
    if value <= 0:
        raise UsageError(f"size {shown!r} must be more than zero bytes", hint="give at least one byte, e.g. 500MB")
    if value > MAX_SIZE:
        raise UsageError(f"size {shown!r} is more than 8 EiB, the largest file size there is", hint="give a smaller size: 5GB")
    return value


def format_size(n: int | float) -> str:
    """Human-readable bytes with decimal units (GB as disks and the hub count them)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
