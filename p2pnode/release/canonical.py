"""Canonical bencode: the only form of bencode p2pnode trusts.

``bencodepy``'s decoder is lenient: it accepts unsorted and duplicate dict keys (the last one
wins) and leading-zero-free integers are not enforced everywhere. A signature covers bytes, not
meaning, so two encodings of "the same" manifest would let an attacker smuggle a second reading
past a signature check. We therefore decode, re-encode, and refuse anything whose bytes differ
(design.md section 10). Decoding errors of any kind become one typed ``ManifestError``.
"""

from __future__ import annotations

from typing import Any

import bencodepy

from ..errors import ManifestError, NotCanonicalError

__all__ = ["decode", "encode"]


def encode(obj: Any) -> bytes:
    """Encode ``obj`` canonically (dict keys sorted as raw bytes)."""
    try:
        return bytes(bencodepy.encode(obj))
    except (KeyError, TypeError, ValueError) as exc:  # bencodepy raises KeyError for floats
        raise TypeError(f"cannot bencode value: {exc!r}") from exc


def decode(data: bytes, *, what: str = "document", max_size: int) -> Any:
    """Decode canonical bencode, refusing oversize, malformed or non-canonical input.

    Raises:
        ManifestError: the bytes are not bencode, or are larger than ``max_size``.
        NotCanonicalError: the bytes decode but differ from their canonical encoding.
    """
    if len(data) > max_size:
        raise ManifestError(f"{what} is {len(data)} bytes, over the limit of {max_size} bytes")
    if not data:
        raise ManifestError(f"{what} is empty")
    try:
        value = bencodepy.decode(bytes(data))
    except RecursionError as exc:
        raise ManifestError(f"{what} nests too deeply to be valid") from exc
    except Exception as exc:  # the decoder signals bad input with many types; translate all
        raise ManifestError(f"{what} is not valid bencode: {exc or type(exc).__name__}") from exc
    try:
        again = bencodepy.encode(value)
    except Exception as exc:
        raise ManifestError(f"{what} holds values bencode cannot express: {exc}") from exc
    if again != data:
        raise NotCanonicalError(
            f"{what} is not canonical bencode (unsorted or duplicate keys, or trailing data)"
        )
    return value
