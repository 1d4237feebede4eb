"""Human sizes: '8GiB' <-> bytes."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}


def parse_bytes(text: str | int | None) -> int | None:
    """'8GiB' -> 8589934592; None/''/'none' -> None. Raises ValueError with the bad text."""
    if text is None or isinstance(text, int):
        return text
    t = text.strip().lower()
    if t in ("", "none", "unlimited"):
        return None
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)", t)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 512MiB, 8GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
