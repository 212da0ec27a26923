"""Helpers for moving encoded bytes: their digest, and chunks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of the bytes as lowercase hex, as carried in upload headers."""
    return hashlib.sha256(data).hexdigest()


def iter_chunks(data: bytes, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    """Splits bytes into ``(offset, piece)`` pairs of at most ``chunk_size`` bytes, in order.

    Raises ValueError at once (not on first iteration) when ``chunk_size`` is not positive.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return ((offset, bytes(data[offset : offset + chunk_size])) for offset in range(0, len(data), chunk_size))
