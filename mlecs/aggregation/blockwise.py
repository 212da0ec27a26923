"""Robust rules that need every update at once, computed block by block from updates spilled to disk.

A median or trimmed mean cannot stream like a weighted sum: each coordinate needs all clients'
values. Holding K updates in memory grows with K, so ``SpilledUpdates`` appends each update to one raw
float32 file per tensor (a row per client) and reads it back with positioned reads, a block of columns
at a time, sized so that one block of K values per column stays under ``block_bytes``. Memory then
stays flat in the number of clients; only the block width shrinks.

``robust_aggregate`` builds on it: a weighted-median centre, each client's anomaly score (per tensor,
its distance to the centre over the median distance of that tensor's holders) and its cosine with the
centre (per tensor), both averaged over the client's tensors by size; optional exclusion of outliers by
either; and the chosen robust rule over the clients kept.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType

import numpy as np

from mlecs.aggregation.base import AggregationError
from mlecs.aggregation.robust import (
    anomaly_scores,
    centre_cosines,
    check_cosine_threshold,
    check_trim,
    size_weighted_means,
    weighted_median,
    weighted_trimmed_mean,
)

__all__ = ["ROBUST_RULES", "CentreMeasures", "RobustResult", "SpilledUpdates", "robust_aggregate"]

ROBUST_RULES = ("median", "trimmed_mean")

Block = tuple[slice, np.ndarray, np.ndarray]
BlockRule = Callable[[np.ndarray, np.ndarray], np.ndarray]


class SpilledUpdates:
    """Client updates kept on disk, one float32 file per tensor, rows = that tensor's holders in add order.

    ``directory`` only chooses where the spill lives: a private temporary directory is created inside
    it (or in the system default when None), so two instances never share files, and ``close()``
    removes it. No file handle stays open between calls.
    """

    def __init__(self, directory: Path | None = None, block_bytes: int = 64 * 1024 * 1024) -> None:
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 4:
            raise AggregationError(f"block_bytes must be an integer >= 4, got {block_bytes!r}")
        self._block_bytes = block_bytes
        self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
            prefix="mlecs-spill-", dir=directory
        )
        self._directory = Path(self._tmp.name)
        self._clients: list[str] = []
        self._known: set[str] = set()
        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._holders: dict[str, list[str]] = {}
        self._weights: dict[str, list[float]] = {}

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Deletes the spill directory; safe to call twice. The instance is unusable afterwards."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SpilledUpdates:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._tmp is None:
            raise AggregationError("the spilled updates were closed; their files are gone")

    # -- what is stored ---------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The private directory holding the spill files (removed by ``close``)."""
        return self._directory

    @property
    def block_bytes(self) -> int:
        return self._block_bytes

    @property
    def clients(self) -> list[str]:
        """Client ids in the order they were added."""
        return list(self._clients)

    @property
    def names(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._files)

    def holders(self, name: str) -> list[str]:
        """The clients holding tensor ``name``, in add order (= row order in its file)."""
        return list(self._holders[self._known_name(name)])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._known_name(name)]

    def _known_name(self, name: str) -> str:
        if name not in self._files:
            raise AggregationError(f"no client sent a tensor {name!r}")
        return name

    # -- writing ----------------------------------------------------------------------------------

    def add(self, client_id: str, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        """Appends one client's tensors as float32 rows; everything is checked before anything is written."""
        self._check_open()
        if not isinstance(client_id, str) or not client_id:
            raise AggregationError(f"a client update needs a non-empty client_id, got {client_id!r}")
        if client_id in self._known:
            raise AggregationError(f"client {client_id!r} was already added")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            w = math.nan  # refused just below, with the same message
        if not math.isfinite(w) or w < 0:
            raise AggregationError(f"client {client_id!r}: weight must be finite and non-negative, got {weight!r}")
        if not tensors:
            raise AggregationError(f"client {client_id!r} sent no tensors")

        rows: dict[str, np.ndarray] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for name, value in tensors.items():
            array = np.asarray(value)
            if array.dtype.kind not in "fiu":
                raise AggregationError(f"tensor {name!r} from client {client_id!r} has dtype {array.dtype}")
            expected = self._shapes.get(name)
            if expected is not None and array.shape != expected:
                raise AggregationError(
                    f"tensor {name!r}: client {client_id!r} sent shape {array.shape}, earlier clients {expected}"
                )
            # Checked after the cast: a float64 value beyond float32's range would be stored as inf.
            with np.errstate(over="ignore"):
                row = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
            if not np.all(np.isfinite(row)):
                raise AggregationError(f"tensor {name!r} from client {client_id!r} has non-finite values")
            rows[name] = row
            shapes[name] = array.shape

        # File names are numbered, not derived from tensor names, which may hold any character.
        paths: dict[str, Path] = {}
        next_index = len(self._files)
        for name in rows:
            path = self._files.get(name)
            if path is None:
                path = self._directory / f"t{next_index}.f32"
                next_index += 1
            paths[name] = path
        self._append_rows({paths[name]: row for name, row in rows.items()})

        self._clients.append(client_id)
        self._known.add(client_id)
        for name in rows:
            if name not in self._files:
                self._files[name] = paths[name]
                self._shapes[name] = shapes[name]
                self._holders[name] = []
                self._weights[name] = []
            self._holders[name].append(client_id)
            self._weights[name].append(w)

    @staticmethod
    def _append_rows(rows: Mapping[Path, np.ndarray]) -> None:
        """Appends each row to its file; if a write fails, cuts every file back so no client is half-added."""
        sizes = {path: path.stat().st_size if path.exists() else 0 for path in rows}
        try:
            for path, row in rows.items():
                with open(path, "ab") as handle:
                    row.tofile(handle)
        except BaseException:
            for path, size in sizes.items():
                with contextlib.suppress(OSError), open(path, "r+b") as handle:
                    handle.truncate(size)
            raise

    # -- reading ----------------------------------------------------------------------------------

    def _excluded(self, exclude: Collection[str]) -> frozenset[str]:
        # An unknown id is most likely a mistake (a typo, another round's client): say so, do not ignore it.
        skip = frozenset(exclude)
        unknown = skip - self._known
        if unknown:
            raise AggregationError(f"cannot exclude unknown clients {sorted(unknown)}")
        return skip

    def iter_blocks(self, name: str, exclude: Collection[str] = ()) -> Iterator[Block]:
        """(columns, float64 values (K', B), weights (K',)) over tensor ``name``'s flattened columns.

        Rows are the holders not in ``exclude``. B is the widest block with K' * B * 8 <= block_bytes
        (at least one column). The weights array is shared between blocks and read-only.
        """
        self._check_open()
        self._known_name(name)
        skip = self._excluded(exclude)
        rows = [i for i, client_id in enumerate(self._holders[name]) if client_id not in skip]
        return self._blocks(name, rows)

    def _blocks(self, name: str, rows: list[int]) -> Iterator[Block]:
        holders = self._holders[name]
        size = math.prod(self._shapes[name])
        if not rows or size == 0:
            return
        weights = np.array([self._weights[name][i] for i in rows], dtype=np.float64)
        weights.flags.writeable = False
        width = max(1, self._block_bytes // (8 * len(rows)))
        row_bytes = 4 * size
        if os.path.getsize(self._files[name]) != row_bytes * len(holders):
            raise AggregationError(f"tensor {name!r}: its spill file does not hold {len(holders)} rows")
        # Explicit reads rather than a memory map: the pages of a mapped file, once touched, count in the
        # process's resident memory until the mapping goes, which would make memory grow with the fleet.
        descriptor = os.open(self._files[name], os.O_RDONLY)
        try:
            for start in range(0, size, width):
                columns = slice(start, min(start + width, size))
                count = columns.stop - columns.start
                block = np.empty((len(rows), count), dtype=np.float32)
                for position, row in enumerate(rows):
                    offset = row * row_bytes + 4 * columns.start
                    block[position] = np.frombuffer(_read_exactly(descriptor, 4 * count, offset), dtype=np.float32)
                yield columns, block.astype(np.float64), weights
        finally:
            os.close(descriptor)

    def reduce(self, rule: BlockRule, exclude: Collection[str] = ()) -> dict[str, np.ndarray]:
        """``rule(values, weights) -> (B,)`` applied block by block; float32 tensors in their shapes, names sorted."""
        self._check_open()
        if not self._clients:
            raise AggregationError("no client updates to aggregate")
        skip = self._excluded(exclude)
        out: dict[str, np.ndarray] = {}
        for name in self.names:
            holders = self._holders[name]
            rows = [i for i, client_id in enumerate(holders) if client_id not in skip]
            if not rows:
                raise AggregationError(f"tensor {name!r}: no holder left after excluding {sorted(skip)}")
            if not sum(self._weights[name][i] for i in rows) > 0:
                kept = ", ".join(holders[i] for i in rows)
                raise AggregationError(f"tensor {name!r}: its holders ({kept}) have zero total weight")
            flat = np.empty(math.prod(self._shapes[name]), dtype=np.float32)
            for columns, values, weights in self._blocks(name, rows):
                try:
                    result = np.asarray(rule(values, weights))
                except AggregationError as error:
                    raise AggregationError(f"tensor {name!r}: {error}") from error
                if result.shape != (values.shape[1],):
                    raise AggregationError(
                        f"tensor {name!r}: the rule returned shape {result.shape} for a block of "
                        f"{values.shape[1]} columns"
                    )
                flat[columns] = result
            if not np.all(np.isfinite(flat)):
                raise AggregationError(f"tensor {name!r}: the rule produced non-finite values")
            out[name] = flat.reshape(self._shapes[name])
        return out

    def distances(self, centre: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Each client's L2 distance to ``centre`` over the tensors it holds (float64, block by block).

        ``centre`` must hold every spilled tensor in its shape; extra names are ignored.
        """
        squares = dict.fromkeys(self._clients, 0.0)
        for per_tensor in self.tensor_distances(centre).values():
            for client_id, distance in per_tensor.items():
                squares[client_id] += distance * distance
        return {client_id: math.sqrt(square) for client_id, square in squares.items()}

    def tensor_distances(self, centre: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
        """Per tensor name, each holder's L2 distance to ``centre`` on that tensor (block by block)."""
        return self.measure(centre).distances

    def tensor_cosines(self, centre: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
        """Per tensor name, each holder's cosine with ``centre`` on that tensor (``centre_cosines``)."""
        return self.measure(centre).cosines

    def measure(self, centre: Mapping[str, np.ndarray]) -> CentreMeasures:
        """Per tensor, each holder's distance to ``centre`` and cosine with it, from one pass over the spill:
        squared distances, dot products and squared norms accumulate block by block."""
        self._check_open()
        if not self._clients:
            raise AggregationError("no client updates to measure")
        distances: dict[str, dict[str, float]] = {}
        cosines: dict[str, dict[str, float]] = {}
        for name in self.names:
            if name not in centre:
                raise AggregationError(f"the centre has no tensor {name!r}")
            target = np.asarray(centre[name])
            if target.shape != self._shapes[name]:
                raise AggregationError(
                    f"tensor {name!r}: the centre has shape {target.shape}, the updates {self._shapes[name]}"
                )
            flat = target.astype(np.float64).reshape(-1)
            if not np.all(np.isfinite(flat)):
                raise AggregationError(f"tensor {name!r}: the centre has non-finite values")
            holders = self._holders[name]
            squares, dots, norms = (np.zeros(len(holders), dtype=np.float64) for _ in range(3))
            for columns, values, _ in self._blocks(name, list(range(len(holders)))):
                part = flat[columns]
                difference = values - part
                squares += np.einsum("kb,kb->k", difference, difference)
                dots += values @ part
                norms += np.einsum("kb,kb->k", values, values)
            distances[name] = {client_id: math.sqrt(float(square))
                               for client_id, square in zip(holders, squares, strict=True)}
            try:
                cosines[name] = centre_cosines(dict(zip(holders, dots.tolist(), strict=True)),
                                               dict(zip(holders, norms.tolist(), strict=True)), float(flat @ flat))
            except AggregationError as error:  # e.g. a squared norm overflowing float64
                raise AggregationError(f"tensor {name!r}: {error}") from error
        return CentreMeasures(distances=distances, cosines=cosines)

    def size(self, name: str) -> int:
        """Number of values in tensor ``name``."""
        return math.prod(self._shapes[name])


@dataclass(frozen=True)
class CentreMeasures:
    """Per tensor name, each of its holders' L2 distance to a centre and cosine with it."""

    distances: dict[str, dict[str, float]]
    cosines: dict[str, dict[str, float]]


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays field-wise is meaningless
class RobustResult:
    """The robust aggregate, every client's anomaly score and cosine with the centre, and the clients
    left out of the aggregate."""

    tensors: dict[str, np.ndarray]
    scores: dict[str, float]
    excluded: frozenset[str]
    cosines: dict[str, float] = field(default_factory=dict)
    """Each client's cosine with the weighted-median centre: per tensor, averaged over its tensors by size."""


def robust_aggregate(
    spilled: SpilledUpdates, rule: str, *, trim: float = 0.1, exclude_above: float | None = None,
    exclude_cosine_below: float | None = None,
) -> RobustResult:
    """Scores clients against a weighted-median centre, drops outliers, then aggregates with ``rule``.

    ``rule`` is "median" or "trimmed_mean" (with ``trim`` of the weight mass cut from each end per
    coordinate). Clients scoring above ``exclude_above`` (distance / median distance) are left out, and
    so are clients whose cosine with the centre is below ``exclude_cosine_below`` (in [-1, 1); 0 leaves
    out updates pointing away from the centre); None keeps everyone. Arguments are checked before the
    (disk-bound) passes over the updates.
    """
    if rule not in ROBUST_RULES:
        raise AggregationError(f"unknown robust rule {rule!r}; valid rules: {', '.join(ROBUST_RULES)}")
    if rule == "trimmed_mean":
        check_trim(trim)
    if exclude_above is not None and not float(exclude_above) > 0:  # also refuses nan
        raise AggregationError(f"exclude_above must be positive (or None), got {exclude_above!r}")
    if exclude_cosine_below is not None:
        try:
            check_cosine_threshold(exclude_cosine_below)
        except AggregationError as error:
            raise AggregationError(f"exclude_cosine_below: {error}") from error

    centre = spilled.reduce(weighted_median)
    measures = spilled.measure(centre)
    sizes = {name: spilled.size(name) for name in spilled.names}
    by_score, by_cosine = _client_scores(measures, sizes), size_weighted_means(measures.cosines, sizes)
    scores = {client_id: by_score[client_id] for client_id in spilled.clients}  # in add order
    cosines = {client_id: by_cosine[client_id] for client_id in spilled.clients}
    excluded = frozenset(
        client_id for client_id in scores
        if (exclude_above is not None and scores[client_id] > exclude_above)
        or (exclude_cosine_below is not None and cosines[client_id] < exclude_cosine_below)
    )
    if excluded and len(excluded) == len(scores):
        raise AggregationError(f"every client scores above exclude_above={exclude_above} or has a cosine below "
                               f"exclude_cosine_below={exclude_cosine_below}: nothing left to aggregate")

    if rule == "median":
        tensors = centre if not excluded else spilled.reduce(weighted_median, exclude=excluded)
    else:
        tensors = spilled.reduce(partial(weighted_trimmed_mean, trim=trim), exclude=excluded)
    return RobustResult(tensors=tensors, scores=scores, excluded=excluded, cosines=cosines)


def _client_scores(measures: CentreMeasures, sizes: Mapping[str, int]) -> dict[str, float]:
    """Each client's anomaly score: per tensor, its distance over the median distance of that tensor's
    holders; then the mean over the tensors it holds, weighted by tensor size. Scoring per tensor keeps
    clients that hold more (or larger) tensors, as devices with more modalities do, from looking
    anomalous for that alone."""
    per_tensor = {name: anomaly_scores(distances) for name, distances in measures.distances.items()}
    return size_weighted_means(per_tensor, sizes)


def _read_exactly(descriptor: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset`` (pread may return fewer than asked)."""
    parts = []
    while size > 0:
        part = os.pread(descriptor, size, offset)
        if not part:
            raise AggregationError("a spill file ended early; it was changed or truncated while in use")
        parts.append(part)
        size -= len(part)
        offset += len(part)
    return b"".join(parts) if len(parts) > 1 else parts[0]
