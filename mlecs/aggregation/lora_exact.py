"""Exact LoRA aggregation: average the products B·A, then re-factorise to rank r.

Averaging the LoRA factors A and B separately (the paper's rule) does not give the average of the
low-rank updates B·A the clients actually applied: (Σ w_k B_k)(Σ w_k A_k) ≠ Σ w_k B_k A_k. This rule
averages the products and returns the best rank-r factorisation of that average (truncated SVD, the
Eckart–Young optimum), split symmetrically between the factors. It works on full adapter weights, not
on deltas: products of deltas mean nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlecs.aggregation.base import AggregationError, ClientUpdate


def lora_pairs(names: Sequence[str] | set[str]) -> list[tuple[str, str]]:
    """(A name, B name) for every ``*.A`` tensor under ``lora.`` whose ``*.B`` partner exists."""
    present = set(names)
    return sorted((n, n[:-1] + "B") for n in present if n.startswith("lora.") and n.endswith(".A")
                  and n[:-1] + "B" in present)


def average_lora_products(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """For each LoRA pair held by the clients: rank-r factors of Σ w_k B_k A_k (weights renormalised per pair).

    ``updates`` carry full adapter weights. Returns float32 A [r, in] and B [out, r] for every pair.
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    if len(weights) != len(updates):
        raise AggregationError(f"{len(weights)} weights for {len(updates)} updates")
    from mlecs.aggregation.streaming import StreamingLoraProducts

    products = StreamingLoraProducts()
    for update, weight in zip(updates, weights, strict=True):
        products.add(update.client_id, update.tensors, weight)
    return products.result()
