"""Byzantine-robust building blocks: norm clipping, coordinate-wise weighted median and trimmed mean.

A plain weighted mean lets one client move the result anywhere. The rules here bound that influence:

* ``clip_update`` caps the global L2 norm of one update before it is aggregated;
* ``weighted_median`` / ``weighted_trimmed_mean`` work per coordinate on a (clients × coordinates)
  block, treating each client's weight as mass, so a weight-2 client counts exactly like two
  identical weight-1 clients;
* ``anomaly_scores`` turns each client's distance to a robust centre into a scale-free score;
* ``centre_cosines`` says which way each client's update points relative to that centre: a sign-flipped
  update has an honest norm and only a modestly larger distance, but its cosine is the negative of the
  honest update it was made from;
* ``size_weighted_means`` combines such per-tensor measures into one number per client.

All arithmetic is float64; the rules return float64 so that callers decide when to round to float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from mlecs.aggregation.base import AggregationError

__all__ = [
    "anomaly_scores",
    "centre_cosines",
    "check_cosine_threshold",
    "check_trim",
    "clip_update",
    "size_weighted_means",
    "update_norm",
    "weighted_median",
    "weighted_trimmed_mean",
]

# Cumulative weights are compared against half the total; summing in a per-column order rounds
# differently, so "exactly half" is judged with this relative tolerance.
_HALF_TOLERANCE = 1e-10


def _as_float_array(name: str, value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise AggregationError(f"tensor {name!r} has dtype {array.dtype}, expected a numeric array")
    return array


def update_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all tensors taken together as one vector, accumulated in float64."""
    squares = 0.0
    for name, value in tensors.items():
        flat = _as_float_array(name, value).astype(np.float64, copy=False).reshape(-1)
        if not np.all(np.isfinite(flat)):
            raise AggregationError(f"tensor {name!r} has non-finite values")
        squares += float(np.dot(flat, flat))
    if not math.isfinite(squares):
        raise AggregationError("the update's squared norm overflows float64")
    return math.sqrt(squares)


def clip_update(tensors: Mapping[str, np.ndarray], max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scales the update down to global norm ``max_norm`` if it is longer; returns (float32 tensors, factor).

    One factor for all tensors keeps the update's direction; factor is 1.0 when nothing was scaled.
    """
    limit = float(max_norm)
    if not math.isfinite(limit) or limit <= 0:
        raise AggregationError(f"max_norm must be finite and positive, got {max_norm!r}")
    norm = update_norm(tensors)
    factor = limit / norm if norm > limit else 1.0
    clipped = {}
    for name, value in tensors.items():
        array = np.asarray(value, dtype=np.float64)
        # Scale in float64 and round once, so the clipped norm is max_norm up to float32 rounding.
        clipped[name] = (array * factor if factor < 1.0 else array).astype(np.float32)
    return clipped, factor


def check_trim(trim: float) -> float:
    """``trim`` as a float if it is a fraction in [0, 0.5) — beyond that nothing would be left to average."""
    value = float(trim)
    if not 0.0 <= value < 0.5:  # also false for nan
        raise AggregationError(f"trim must be in [0, 0.5), got {trim!r}")
    return value


def _check_block(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 (K, B) values and (K,) weights; AggregationError says what does not fit."""
    raw = np.asarray(values)
    if raw.ndim != 2:
        raise AggregationError(f"values must be 2-D (clients × coordinates), got shape {raw.shape}")
    if raw.dtype.kind not in "fiu":
        raise AggregationError(f"values have dtype {raw.dtype}, expected a numeric array")
    clients = raw.shape[0]
    if clients == 0:
        raise AggregationError("values hold no clients (K = 0)")
    raw_weights = np.asarray(weights)
    if raw_weights.ndim != 1 or raw_weights.shape[0] != clients:
        raise AggregationError(f"weights have shape {raw_weights.shape}, expected ({clients},) — one per client row")
    if raw_weights.dtype.kind not in "fiu":
        raise AggregationError(f"weights have dtype {raw_weights.dtype}, expected a numeric array")
    w = raw_weights.astype(np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise AggregationError(f"weights must be finite and non-negative, got {w.tolist()}")
    if not w.sum() > 0:
        raise AggregationError("weights sum to zero: no client can carry weight")
    v = raw.astype(np.float64, copy=False)
    finite = np.isfinite(v)
    if not np.all(finite):
        row, column = (int(i) for i in np.argwhere(~finite)[0])
        raise AggregationError(f"values are not finite: client row {row}, coordinate {column} is {v[row, column]}")
    return v, w


def _sort_columns(values: np.ndarray, raw: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column sorted by value, with the weights carried along, as two (B, K) arrays: one row per column.

    Sorting runs along contiguous rows of the transposed block, in the input's own float dtype (a float32
    to float64 cast is exact, so the order is the same): about three times faster than an argsort down
    the columns of the (K, B) block. Tied values may come out in any order; every rule below only reads
    values, and tied values are equal.
    """
    keys = raw if raw.dtype.kind == "f" else values
    order = np.argsort(np.ascontiguousarray(keys.T), axis=1)
    return np.take_along_axis(np.ascontiguousarray(values.T), order, axis=1), weights[order]


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-column weighted median of (K, B) ``values``; float64 (B,).

    The median is the first sorted value at which the cumulative weight reaches half the total. When
    the cumulative weight lands exactly on half, the median lies between that value and the next one
    that carries weight, and the two are averaged — with equal weights this is ``np.median``.
    """
    v, w = _check_block(values, weights)
    sorted_values, sorted_weights = _sort_columns(v, np.asarray(values), w)
    cumulative = np.cumsum(sorted_weights, axis=1)
    total = cumulative[:, -1:]  # per column, summed in the same order as the comparisons below
    half = total / 2
    slack = total * _HALF_TOLERANCE
    # argmax of a boolean row is the first True; both always exist since total > half + slack.
    lower = np.argmax(cumulative >= half - slack, axis=1)
    # Strictly past half: skips zero-weight elements, so a client with weight 0 is never "the next one".
    upper = np.argmax(cumulative > half + slack, axis=1)
    columns = np.arange(v.shape[1])
    result: np.ndarray = (sorted_values[columns, lower] + sorted_values[columns, upper]) / 2
    return result


def weighted_trimmed_mean(values: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    """Per-column weighted mean after removing weight mass ``trim * W`` from each end; float64 (B,).

    Laying the sorted values end to end, element i covers the weight interval [C_{i-1}, C_i]; only
    the part inside [trim W, (1 - trim) W] counts. An element straddling a boundary therefore counts
    with the fraction of its weight that lies inside, which keeps the rule continuous in the weights.
    """
    fraction = check_trim(trim)
    v, w = _check_block(values, weights)
    sorted_values, sorted_weights = _sort_columns(v, np.asarray(values), w)
    upper_edge = np.cumsum(sorted_weights, axis=1)
    # The previous element's upper edge (not upper - weight) so the intervals tile the mass exactly.
    lower_edge = np.zeros_like(upper_edge)
    lower_edge[:, 1:] = upper_edge[:, :-1]
    total = upper_edge[:, -1:]
    low, high = fraction * total, total - fraction * total
    kept = np.clip(np.minimum(upper_edge, high) - np.maximum(lower_edge, low), 0.0, None)
    result: np.ndarray = np.einsum("bk,bk->b", kept, sorted_values) / kept.sum(axis=1)
    return result


def anomaly_scores(distances: Mapping[str, float]) -> dict[str, float]:
    """Each client's distance divided by the median distance, so a typical client scores about 1.

    Dividing by the median makes the score independent of the update's scale and leaves it
    meaningful while fewer than half the clients are outliers. If the median distance is 0, clients
    at the centre score 0 and every other client scores infinity.
    """
    if not distances:
        raise AggregationError("no client distances to score")
    for client_id, distance in distances.items():
        if not math.isfinite(distance) or distance < 0:
            raise AggregationError(f"client {client_id!r}: distance must be finite and non-negative, got {distance}")
    median = float(np.median(np.fromiter(distances.values(), dtype=np.float64, count=len(distances))))
    if median == 0:
        return {client_id: 0.0 if distance == 0 else math.inf for client_id, distance in distances.items()}
    return {client_id: float(distance) / median for client_id, distance in distances.items()}


def check_cosine_threshold(threshold: float) -> float:
    """``threshold`` as a float if it is a cosine in [-1, 1): at 1 even an update along the centre would fall below."""
    value = float(threshold)
    if not -1.0 <= value < 1.0:  # also false for nan
        raise AggregationError(f"a cosine threshold must be in [-1, 1), got {threshold!r}")
    return value


def centre_cosines(dots: Mapping[str, float], squared_norms: Mapping[str, float],
                   centre_squared_norm: float) -> dict[str, float]:
    """Each client's cosine with the centre on one tensor, from its dot product with the centre and the
    squared norms (sums a blockwise pass accumulates, so no update is ever held whole).

    Where a norm is zero there is no direction to compare: an update and a centre that are both zero
    agree (1.0: the client sent exactly the centre), and when only one of them is zero the client
    neither follows nor opposes the centre (0.0). Rounding can push a cosine a hair past ±1; it is
    clamped to [-1, 1].
    """
    centre = float(centre_squared_norm)
    if not math.isfinite(centre) or centre < 0:
        raise AggregationError(f"the centre's squared norm must be finite and non-negative, got {centre_squared_norm}")
    if set(dots) != set(squared_norms):
        raise AggregationError(f"dot products and squared norms name different clients: "
                               f"{sorted(set(dots) ^ set(squared_norms))}")
    out = {}
    for client_id, dot in dots.items():
        square = float(squared_norms[client_id])
        if not math.isfinite(dot) or not math.isfinite(square) or square < 0:
            raise AggregationError(f"client {client_id!r}: dot product {dot} and squared norm {square} must be "
                                   "finite, the squared norm non-negative")
        if square == 0 or centre == 0:
            out[client_id] = 1.0 if square == centre else 0.0
        else:
            out[client_id] = min(1.0, max(-1.0, float(dot) / (math.sqrt(square) * math.sqrt(centre))))
    return out


def size_weighted_means(per_tensor: Mapping[str, Mapping[str, float]], sizes: Mapping[str, int]) -> dict[str, float]:
    """Each client's mean of its per-tensor values (``per_tensor[name][client]``) over the tensors it holds,
    weighted by tensor size, so that a client's measure reflects its parameters rather than how its update
    is cut into tensors. A client holding only empty tensors gets the plain mean of its values."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    plain: dict[str, list[float]] = {}
    for name, values in per_tensor.items():
        if name not in sizes:
            raise AggregationError(f"no size for tensor {name!r}")
        size = sizes[name]
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
            raise AggregationError(f"tensor {name!r}: size must be a non-negative integer, got {size!r}")
        for client_id, value in values.items():
            if math.isnan(value):
                raise AggregationError(f"tensor {name!r}, client {client_id!r}: the value is nan")
            plain.setdefault(client_id, []).append(float(value))
            weights[client_id] = weights.get(client_id, 0.0) + size
            if size:  # an empty tensor adds nothing (and 0 × an infinite score would be nan)
                totals[client_id] = totals.get(client_id, 0.0) + size * float(value)
    return {client_id: totals[client_id] / weights[client_id] if weights[client_id] > 0
            else float(np.mean(own)) for client_id, own in plain.items()}
