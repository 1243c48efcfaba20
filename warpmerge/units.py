"""Sizes in bytes, as users write them and as we print them: decimal units, as disks and
transformers' `max_shard_size` count; 'GiB' and friends are binary."""

from __future__ import annotations

import math
import re

SIZE_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(value: int | str, what: str = "size") -> int:
    """'5GB' -> 5_000_000_000 (decimal, as transformers); 'GiB' units are binary."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number of bytes or a string like '5GB'")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in SIZE_UNITS:
            raise ValueError(f"{what} must be like '5GB', '500MB' or a number of bytes")
        number, unit = float(m.group(1)), m.group(2).upper()
    size = number * SIZE_UNITS[unit]
    if not math.isfinite(size) or size >= 2**63:
        raise ValueError(f"{what} is too large")
    size = int(size)
    if size <= 0:
        raise ValueError(f"{what} must be greater than 0")
    return size


def format_bytes(n: float) -> str:
    """Decimal units, as disk sizes and shard sizes are given: 1234567 -> '1.2 MB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"
