"""The client update the aggregators consume, and the per-tensor weighted average they share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["AggregationError", "ClientUpdate", "normalise_weights", "weighted_average_per_tensor"]


class AggregationError(ValueError):
    """A set of client updates cannot be aggregated; the message names the client or tensor at fault.

    Raised for no updates, a malformed update, weights that do not fit the updates, tensors whose
    shapes disagree between clients, non-finite values, or a tensor (or round) whose total weight is
    not positive. Not retryable with the same updates.
    """


@dataclass(frozen=True, eq=False)  # eq=False: comparing or hashing arrays field-wise is meaningless
class ClientUpdate:
    """One client's contribution to a round: the tensors it trained, its sample count and modalities.

    A client holds only some tensors (e.g. the extractors of its own modalities), so ``tensors`` may
    be any subset of the global names.
    """

    client_id: str
    tensors: Mapping[str, np.ndarray]
    num_samples: int
    modalities: frozenset[str]

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, str) or not self.client_id:
            raise AggregationError(f"a client update needs a non-empty client_id, got {self.client_id!r}")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int | np.integer):
            raise AggregationError(f"client {self.client_id!r}: num_samples must be an integer")
        if self.num_samples < 0:
            raise AggregationError(f"client {self.client_id!r}: num_samples is negative ({self.num_samples})")
        if not isinstance(self.modalities, frozenset):
            # Accept any iterable of names; store the immutable form the type promises.
            object.__setattr__(self, "modalities", frozenset(self.modalities))
        if not self.modalities:
            raise AggregationError(f"client {self.client_id!r}: an update needs at least one modality")


def normalise_weights(raw: Sequence[float], what: str) -> list[float]:
    """Scales non-negative finite weights to sum to 1; raises AggregationError if they cannot be."""
    values = np.asarray(raw, dtype=np.float64)
    if values.size == 0:
        raise AggregationError("no client updates to aggregate")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise AggregationError(f"{what} must be finite and non-negative, got {list(map(float, values))}")
    total = float(values.sum())
    if total <= 0:
        raise AggregationError(f"{what} sum to zero: no client can carry weight")
    return [float(v) for v in values / total]


def weighted_average_per_tensor(
    updates: Sequence[ClientUpdate], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Averages each tensor over exactly the clients that hold it, with their weights renormalised.

    For a name held by clients H, the result is ``sum_{k in H} w_k x_k / sum_{k in H} w_k``,
    accumulated in float64 and returned as float32, names in sorted order. Clients with weight 0 take
    no part (their shapes are still checked). Raises AggregationError for no updates, a weight count
    that does not match, negative or non-finite weights, shapes that disagree for a name, a name whose
    holders have zero total weight, or a non-finite result (a holder sent nan/inf).
    """
    if not updates:
        raise AggregationError("no client updates to aggregate")
    if len(weights) != len(updates):
        raise AggregationError(f"{len(weights)} weights given for {len(updates)} client updates")
    weight_values = [float(w) for w in weights]
    if not all(np.isfinite(w) and w >= 0 for w in weight_values):
        raise AggregationError(f"weights must be finite and non-negative, got {weight_values}")

    holders: dict[str, list[int]] = {}
    for index, update in enumerate(updates):
        for name in update.tensors:
            holders.setdefault(name, []).append(index)

    result: dict[str, np.ndarray] = {}
    for name in sorted(holders):
        result[name] = _average_one(
            name, [updates[i] for i in holders[name]], [weight_values[i] for i in holders[name]]
        )
    return result


def _average_one(name: str, holders: list[ClientUpdate], weights: list[float]) -> np.ndarray:
    arrays = [np.asarray(update.tensors[name]) for update in holders]
    shape = arrays[0].shape
    for update, array in zip(holders, arrays, strict=True):
        if array.shape != shape:
            shapes = ", ".join(f"{u.client_id}={a.shape}" for u, a in zip(holders, arrays, strict=True))
            raise AggregationError(f"tensor {name!r}: shapes disagree between clients ({shapes})")
        if array.dtype.kind not in "fiu":
            raise AggregationError(
                f"tensor {name!r} from client {update.client_id!r} has dtype {array.dtype}"
            )

    total = sum(weights)
    if total <= 0:
        ids = ", ".join(u.client_id for u in holders)
        raise AggregationError(f"tensor {name!r}: its holders ({ids}) have zero total weight")

    accumulator = np.zeros(shape, dtype=np.float64)
    scratch = np.empty(shape, dtype=np.float64)
    for array, weight in zip(arrays, weights, strict=True):
        if weight == 0:
            continue
        # Multiply into a float64 buffer: with a plain Python float the product would stay float32.
        np.multiply(array, weight / total, out=scratch, dtype=np.float64)
        accumulator += scratch
    averaged = accumulator.astype(np.float32)
    if not np.all(np.isfinite(averaged)):
        culprits = [u.client_id for u, a in zip(holders, arrays, strict=True) if not np.all(np.isfinite(a))]
        detail = f"non-finite values from {culprits}" if culprits else "the average overflows float32"
        raise AggregationError(f"tensor {name!r}: {detail}")
    return averaged
