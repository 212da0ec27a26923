"""Deterministic, order-independent initialisation of model parts from one seed."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def part_seed(seed: int, part: str) -> int:
    """Derives the seed of one named model part, so parts do not depend on which others were built."""
    return (int(seed) * 1_000_003 + zlib.crc32(part.encode("utf-8"))) % (2**63 - 1)


@contextmanager
def seeded(seed: int, part: str) -> Iterator[None]:
    """Runs the block with torch's CPU RNG seeded for ``part``, restoring the caller's RNG state after.

    Devices hold different subsets of the extractors, so drawing every part from one shared stream
    would give a tensor different values on different devices; one stream per part avoids that.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(part_seed(seed, part))
        yield
