"""What a client says about itself, bounded: its sample count weighs its update, and nothing checks it.

``capped_sample_counts`` is the coordinator's rule (``FederationConfig.max_weight_ratio``), kept here so
the simulations that measure it run the same function.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def capped_sample_counts(counts: Sequence[int], ratio: float) -> list[int]:
    """Each count capped at ``ratio`` times the lower median count (``ratio`` 0, or fewer than two counts:
    unchanged). The lower median, so that with two clients the smaller count sets the bar; while fewer than
    half the clients inflate their counts, an honest count sets it, and k inflating clients out of n weigh
    at most k * ratio / (k * ratio + n - k) of the round (with honest counts near the median)."""
    if ratio < 0 or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number >= 0, got {ratio!r}")
    if not ratio or len(counts) < 2:
        return list(counts)
    ceiling = max(1, math.floor(ratio * statistics.median_low(counts)))
    return [min(count, ceiling) for count in counts]
