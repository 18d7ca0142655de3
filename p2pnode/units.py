"""Human sizes and rates, spelled the way aria2 spells them.

``40M`` is 40 MiB per second, ``512K`` is 512 KiB per second, ``0`` means unlimited; a plain
number is bytes. Binary multiples, as aria2 uses, so that a user's ``--max-download-rate 40M``
means the same thing in both tools.
"""

from __future__ import annotations

import re

from .errors import UsageError

__all__ = ["format_bytes", "format_count", "parse_rate", "parse_size"]

_SUFFIX = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse ``1.5G`` / ``40M`` / ``512K`` / ``4096`` into bytes."""
    match = _PATTERN.match(text)
    if not match:
        raise UsageError(
            f"cannot read {what} {text!r}",
            fix=f"write the {what} as a number with an optional K, M or G suffix, like 40M",
        )
    number, suffix = match.groups()
    return int(float(number) * _SUFFIX[suffix.upper()])


def parse_rate(text: str) -> int | None:
    """Parse a rate in bytes per second; ``0`` (unlimited) gives ``None``."""
    value = parse_size(text, what="rate")
    return value or None


def format_bytes(n: float) -> str:
    """Render a byte count for people: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_count(n: float, noun: str) -> str:
    """A forecast's count of machines for people: ``0.1`` nodes is "under 1 node", ``12.4`` is
    "about 12 nodes" (a share of a fleet is rarely whole; the JSON keeps the exact figure)."""
    if n <= 0:
        return f"0 {noun}s"
    if n < 0.5:
        return f"under 1 {noun}"
    whole = round(n)
    about = "" if abs(n - whole) < 1e-9 else "about "
    return f"{about}{whole} {noun}{'' if whole == 1 else 's'}"
