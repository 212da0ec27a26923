"""Aggregation one update at a time: memory holds one accumulator per tensor, whatever the fleet size.

The coordinator decodes each accepted update, adds it with its (already final) weight and drops it,
so aggregating 1000 updates needs the memory of one update plus the running sums. Both rules here are
linear in the updates, which is what lets them stream:

* ``StreamingAverage``: per tensor, ``Σ w_k x_k / Σ w_k`` over the clients that hold it;
* ``mlecs.aggregation.lora_exact.StreamingLoraProducts``: per LoRA pair, ``Σ w_k B_k A_k / Σ w_k``,
  re-factorised to rank r at the end (the exact-LoRA rule, all of it in that module).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mlecs.aggregation.base import AggregationError

__all__ = ["StreamingAverage", "check_weight", "merge_averages"]


def check_weight(client_id: str, weight: float) -> float:
    value = float(weight)
    if not np.isfinite(value) or value < 0:
        raise AggregationError(f"client {client_id!r}: weight must be finite and non-negative, got {value}")
    return value


class StreamingAverage:
    """Per-tensor weighted average over the clients holding each tensor, fed one client at a time."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._totals: dict[str, float] = {}
        self._holders: dict[str, list[str]] = {}
        self._scratch: dict[tuple[int, ...], np.ndarray] = {}

    def add(self, client_id: str, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        """Adds ``weight * tensor`` to each named sum; shapes must agree with earlier holders."""
        w = check_weight(client_id, weight)
        for name, value in tensors.items():
            array = np.asarray(value)
            if array.dtype.kind not in "fiu":
                raise AggregationError(f"tensor {name!r} from client {client_id!r} has dtype {array.dtype}")
            total = self._sums.get(name)
            if total is None:
                total = self._sums[name] = np.zeros(array.shape, dtype=np.float64)
                self._totals[name] = 0.0
                self._holders[name] = []
            elif total.shape != array.shape:
                raise AggregationError(f"tensor {name!r}: client {client_id!r} sent shape {array.shape}, "
                                       f"earlier clients {total.shape}")
            self._holders[name].append(client_id)
            if w == 0:
                continue
            scratch = self._scratch.get(array.shape)
            if scratch is None:
                scratch = self._scratch[array.shape] = np.empty(array.shape, dtype=np.float64)
            # Multiply into a float64 buffer: with a plain Python float the product would stay float32.
            np.multiply(array, w, out=scratch, dtype=np.float64)
            total += scratch
            self._totals[name] += w

    def result(self) -> dict[str, np.ndarray]:
        """The float32 averages, names sorted; AggregationError for no updates, zero weight or non-finite sums."""
        if not self._sums:
            raise AggregationError("no client updates to aggregate")
        out = {}
        for name in sorted(self._sums):
            total = self._totals[name]
            if total <= 0:
                raise AggregationError(
                    f"tensor {name!r}: its holders ({', '.join(self._holders[name])}) have zero total weight")
            averaged = (self._sums[name] / total).astype(np.float32)
            if not np.all(np.isfinite(averaged)):
                raise AggregationError(f"tensor {name!r}: non-finite values from one of {self._holders[name]}")
            out[name] = averaged
        return out


def merge_averages(parts: list[tuple[StreamingAverage, float]]) -> StreamingAverage:
    """One average from several, each part's sums and weights scaled by its factor.

    Lets weights that are only known at the end (a factor shared by a whole group of clients) be
    applied after the clients were added: Σ_c s_c Σ_k w_k x_k / Σ_c s_c Σ_k w_k.
    """
    merged = StreamingAverage()
    for part, scale in parts:
        check_weight("merge", scale)
        for name, total in part._sums.items():
            if name not in merged._sums:
                merged._sums[name] = np.zeros_like(total)
                merged._totals[name] = 0.0
                merged._holders[name] = []
            merged._sums[name] += scale * total
            merged._totals[name] += scale * part._totals[name]
            merged._holders[name].extend(part._holders[name])
    return merged
