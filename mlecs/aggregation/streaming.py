"""Aggregation one update at a time: memory holds one accumulator per tensor, whatever the fleet size.

The coordinator decodes each accepted update, adds it with its (already final) weight and drops it,
so aggregating 1000 updates needs the memory of one update plus the running sums. Both rules here are
linear in the updates, which is what lets them stream:

* ``StreamingAverage``: per tensor, ``Σ w_k x_k / Σ w_k`` over the clients that hold it;
* ``StreamingLoraProducts``: per LoRA pair, ``Σ w_k B_k A_k / Σ w_k``, re-factorised to rank r at the end
  (the exact-LoRA rule of ``mlecs.aggregation.lora_exact``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mlecs.aggregation.base import AggregationError

__all__ = ["StreamingAverage", "StreamingLoraProducts", "merge_averages", "merge_lora_products"]


def _check_weight(client_id: str, weight: float) -> float:
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
        w = _check_weight(client_id, weight)
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


class StreamingLoraProducts:
    """Exact LoRA aggregation fed one client at a time: ``Σ w B·A`` per pair, SVD at the end.

    Clients pass full adapter weights (base + delta): products of deltas mean nothing.
    """

    def __init__(self) -> None:
        self._products: dict[tuple[str, str], np.ndarray] = {}
        self._totals: dict[tuple[str, str], float] = {}
        self._ranks: dict[tuple[str, str], int] = {}

    def add(self, client_id: str, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        from mlecs.aggregation.lora_exact import lora_pairs

        w = _check_weight(client_id, weight)
        for pair in lora_pairs(set(tensors)):
            a = np.asarray(tensors[pair[0]], dtype=np.float64)
            b = np.asarray(tensors[pair[1]], dtype=np.float64)
            rank = self._ranks.setdefault(pair, a.shape[0])
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise AggregationError(f"{client_id}: {pair[0]}/{pair[1]} do not have rank {rank}")
            term = w * (b @ a)
            if pair in self._products:
                if self._products[pair].shape != term.shape:
                    raise AggregationError(f"{client_id}: {pair[0]}/{pair[1]} shapes disagree with earlier clients")
                self._products[pair] += term
            else:
                self._products[pair] = term
            self._totals[pair] = self._totals.get(pair, 0.0) + w

    def result(self) -> dict[str, np.ndarray]:
        """float32 A [r, in] and B [out, r] for every pair: the best rank-r factors of the average product."""
        if not self._products:
            raise AggregationError("no updates to aggregate")
        out: dict[str, np.ndarray] = {}
        for (a_name, b_name), product in sorted(self._products.items()):
            total = self._totals[(a_name, b_name)]
            if total <= 0:
                raise AggregationError(f"weights of the holders of {a_name} sum to zero: no client can carry weight")
            rank = self._ranks[(a_name, b_name)]
            u, s, vt = np.linalg.svd(product / total, full_matrices=False)
            root = np.sqrt(s[:rank])
            out[b_name] = (u[:, :rank] * root).astype(np.float32)
            out[a_name] = (root[:, None] * vt[:rank]).astype(np.float32)
        return out


def merge_averages(parts: list[tuple[StreamingAverage, float]]) -> StreamingAverage:
    """One average from several, each part's sums and weights scaled by its factor.

    Lets weights that are only known at the end (a factor shared by a whole group of clients) be
    applied after the clients were added: Σ_c s_c Σ_k w_k x_k / Σ_c s_c Σ_k w_k.
    """
    merged = StreamingAverage()
    for part, scale in parts:
        _check_weight("merge", scale)
        for name, total in part._sums.items():
            if name not in merged._sums:
                merged._sums[name] = np.zeros_like(total)
                merged._totals[name] = 0.0
                merged._holders[name] = []
            merged._sums[name] += scale * total
            merged._totals[name] += scale * part._totals[name]
            merged._holders[name].extend(part._holders[name])
    return merged


def merge_lora_products(parts: list[tuple[StreamingLoraProducts, float]]) -> StreamingLoraProducts:
    """``merge_averages`` for exact-LoRA products."""
    merged = StreamingLoraProducts()
    for part, scale in parts:
        _check_weight("merge", scale)
        for pair, product in part._products.items():
            merged._ranks.setdefault(pair, part._ranks[pair])
            merged._products[pair] = merged._products.get(pair, 0) + scale * product
            merged._totals[pair] = merged._totals.get(pair, 0.0) + scale * part._totals[pair]
    return merged
