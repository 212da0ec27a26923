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

from mlecs.aggregation.base import AggregationError, ClientUpdate, normalise_weights


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
    names = set().union(*(u.tensors.keys() for u in updates))
    out: dict[str, np.ndarray] = {}
    for a_name, b_name in lora_pairs(names):
        holders = [(u, w) for u, w in zip(updates, weights, strict=True)
                   if a_name in u.tensors and b_name in u.tensors]
        share = normalise_weights([w for _, w in holders], f"weights of the holders of {a_name}")
        rank = np.asarray(holders[0][0].tensors[a_name]).shape[0]
        product = None
        for (update, _), w in zip(holders, share, strict=True):
            a = np.asarray(update.tensors[a_name], dtype=np.float64)
            b = np.asarray(update.tensors[b_name], dtype=np.float64)
            if a.shape[0] != rank or b.shape[1] != rank:
                raise AggregationError(f"{update.client_id}: {a_name}/{b_name} do not have rank {rank}")
            term = w * (b @ a)
            product = term if product is None else product + term
        assert product is not None
        u, s, vt = np.linalg.svd(product, full_matrices=False)
        root = np.sqrt(s[:rank])
        out[b_name] = (u[:, :rank] * root).astype(np.float32)
        out[a_name] = (root[:, None] * vt[:rank]).astype(np.float32)
    return out
