"""Exact LoRA aggregation: average the products B·A, then re-factorise to rank r.

Averaging the LoRA factors A and B separately (the paper's rule) does not give the average of the
low-rank updates B·A the clients actually applied: (Σ w_k B_k)(Σ w_k A_k) ≠ Σ w_k B_k A_k. This rule
averages the products and returns the best rank-r factorisation of that average (truncated SVD, the
Eckart–Young optimum), split symmetrically between the factors. It works on full adapter weights, not
on deltas: products of deltas mean nothing. ``StreamingLoraProducts`` computes it one update at a time (the
coordinator's way); ``average_lora_products`` over a list (the simulations').
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mlecs.aggregation.base import AggregationError, ClientUpdate
from mlecs.aggregation.streaming import check_weight
from mlecs.tensor_names import LORA_PREFIX


def lora_pairs(names: Sequence[str] | set[str]) -> list[tuple[str, str]]:
    """(A name, B name) for every ``*.A`` tensor under ``lora.`` whose ``*.B`` partner exists."""
    present = set(names)
    return sorted((n, n[:-1] + "B") for n in present if n.startswith(LORA_PREFIX) and n.endswith(".A")
                  and n[:-1] + "B" in present)


def average_lora_products(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """For each LoRA pair held by the clients: rank-r factors of Σ w_k B_k A_k (weights renormalised per pair).

    ``updates`` carry full adapter weights. Returns float32 A [r, in] and B [out, r] for every pair.
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    if len(weights) != len(updates):
        raise AggregationError(f"{len(weights)} weights for {len(updates)} updates")
    products = StreamingLoraProducts()
    for update, weight in zip(updates, weights, strict=True):
        products.add(update.client_id, update.tensors, weight)
    return products.result()


class StreamingLoraProducts:
    """Exact LoRA aggregation fed one client at a time: ``Σ w B·A`` per pair, SVD at the end.

    Clients pass full adapter weights (base + delta): products of deltas mean nothing.
    """

    def __init__(self) -> None:
        self._products: dict[tuple[str, str], np.ndarray] = {}
        self._totals: dict[tuple[str, str], float] = {}
        self._ranks: dict[tuple[str, str], int] = {}

    def add(self, client_id: str, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        w = check_weight(client_id, weight)
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


def merge_lora_products(parts: list[tuple[StreamingLoraProducts, float]]) -> StreamingLoraProducts:
    """``mlecs.aggregation.streaming.merge_averages`` for exact-LoRA products."""
    merged = StreamingLoraProducts()
    for part, scale in parts:
        check_weight("merge", scale)
        for pair, product in part._products.items():
            merged._ranks.setdefault(pair, part._ranks[pair])
            merged._products[pair] = merged._products.get(pair, 0) + scale * product
            merged._totals[pair] = merged._totals.get(pair, 0.0) + scale * part._totals[pair]
    return merged
