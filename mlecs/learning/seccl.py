"""SE-CCL: contrastive alignment of fused representations with the cloud's anchors.

Two kinds of anchor come down from the coordinator with every global version:

* **sample anchors**: the cloud model's fused ``z`` for each public sample id. An edge pulls its own
  ``z`` of a public sample toward the cloud's ``z`` of the same id and away from the other ids in the
  batch (cloud -> edge). The cloud does the same toward the edges' uploaded ``z`` (edge -> cloud).
* **class anchors**: MiniLM embeddings of the class descriptions ("the digit seven"). They live in the
  language model's 384-d space; a fixed projection (a pure function of the dimensions, identical on
  every participant, never trained or shipped) maps them into the fused space, where each sample's
  ``z`` is pulled toward its class's anchor and away from the other classes'.

Both terms are InfoNCE over cosine similarities with a temperature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mlecs.tensor_names import SAMPLE_ANCHOR_IDS, SAMPLE_ANCHORS, TEXT_ANCHORS  # the anchor set's tensors

# Seed of the fixed text -> fused projection; a constant of the method, like a hash function.
_PROJECTION_SEED = 20260211


@lru_cache(maxsize=8)
def _projection(in_dim: int, out_dim: int) -> np.ndarray:
    gaussian = np.random.default_rng(_PROJECTION_SEED).standard_normal((max(in_dim, out_dim), min(in_dim, out_dim)))
    basis, _ = np.linalg.qr(gaussian)  # orthonormal columns: preserves angles within the kept subspace
    return (basis if in_dim >= out_dim else basis.T).astype(np.float32)[:in_dim, :out_dim]


def project_class_anchors(text_anchors: np.ndarray, fused_dim: int) -> np.ndarray:
    """Maps class text anchors [C, d_text] into the fused space [C, fused_dim], rows L2-normalised."""
    text = np.asarray(text_anchors, dtype=np.float32)
    if text.ndim != 2 or text.shape[0] < 2:
        raise ValueError(f"text anchors must be [classes >= 2, dim], got shape {list(text.shape)}")
    projected = text @ _projection(text.shape[1], fused_dim)
    return projected / np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)


def sample_anchor_loss(fused: torch.Tensor, anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: row i of ``fused`` must pick row i of ``anchors`` (same sample id) among the batch.

    ``anchors`` are targets (no gradient flows into them). Needs at least two rows to contrast; with
    one it returns a zero that keeps the graph.
    """
    _check_temperature(temperature)
    if fused.shape != anchors.shape:
        raise ValueError(f"fused {list(fused.shape)} and anchors {list(anchors.shape)} differ in shape")
    if fused.shape[0] < 2:
        return fused.sum() * 0.0
    logits = F.normalize(fused, dim=-1) @ F.normalize(anchors.detach(), dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(fused.shape[0], device=fused.device))


def class_anchor_loss(fused: torch.Tensor, labels: torch.Tensor, class_anchors: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """InfoNCE against the class anchors: each ``z`` must pick its label's anchor among all classes."""
    _check_temperature(temperature)
    logits = F.normalize(fused, dim=-1) @ F.normalize(class_anchors.detach(), dim=-1).T / temperature
    return F.cross_entropy(logits, labels)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


@dataclass(frozen=True, eq=False)
class Anchors:
    """What the anchor generator publishes with a global version.

    ``sample_ids``/``fused``: the cloud's fused ``z`` per public sample id (may be empty before the
    cloud has a model worth imitating); ``text``: the class text anchors in the language model's space.
    """

    sample_ids: np.ndarray
    fused: np.ndarray
    text: np.ndarray | None = None

    def __post_init__(self) -> None:
        ids = np.asarray(self.sample_ids)
        if ids.ndim != 1 or self.fused.ndim != 2 or self.fused.shape[0] != ids.shape[0]:
            raise ValueError(
                f"anchors need ids [N] and fused [N, d]; got {list(ids.shape)} and {list(self.fused.shape)}"
            )
        if len(np.unique(ids)) != len(ids):
            raise ValueError("anchor sample ids must be unique")

    def to_tensors(self) -> dict[str, np.ndarray]:
        """The anchor set as named arrays for the codec (ids as exact float32: they are < 2**24)."""
        tensors = {}
        if self.text is not None:
            tensors[TEXT_ANCHORS] = np.asarray(self.text, dtype=np.float32)
        if len(self.sample_ids):
            tensors[SAMPLE_ANCHOR_IDS] = np.asarray(self.sample_ids, dtype=np.float32)
            tensors[SAMPLE_ANCHORS] = np.asarray(self.fused, dtype=np.float32)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], fused_dim: int) -> Anchors:
        """Reads an anchor set written by :meth:`to_tensors` (either part may be absent)."""
        ids = np.asarray(tensors.get(SAMPLE_ANCHOR_IDS, np.zeros(0)), dtype=np.float64)
        if len(ids) and (not np.all(ids == np.round(ids)) or ids.min() < 0):
            raise ValueError("anchor sample ids must be non-negative integers")
        fused = np.asarray(tensors.get(SAMPLE_ANCHORS, np.zeros((0, fused_dim))), dtype=np.float32)
        if fused.ndim != 2 or fused.shape[1] != fused_dim:
            raise ValueError(f"sample anchors have shape {list(fused.shape)}, expected [N, {fused_dim}]")
        text = tensors.get(TEXT_ANCHORS)
        if text is not None and (np.ndim(text) != 2 or len(text) < 2):
            raise ValueError(f"text anchors have shape {list(np.shape(text))}, expected [classes >= 2, dim]")
        return cls(sample_ids=ids.astype(np.int64), fused=fused,
                   text=None if text is None else np.asarray(text, dtype=np.float32))

    def lookup(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (positions into ``sample_ids`` that have an anchor, their anchors [k, d])."""
        order = np.argsort(self.sample_ids)
        sorted_ids = np.asarray(self.sample_ids)[order]
        where = np.searchsorted(sorted_ids, sample_ids)
        where = np.clip(where, 0, max(len(sorted_ids) - 1, 0))
        hit = (sorted_ids[where] == sample_ids) if len(sorted_ids) else np.zeros(len(sample_ids), dtype=bool)
        positions = np.nonzero(hit)[0]
        return positions, self.fused[order[where[positions]]]


AlignmentLoss = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
"""(model output with ``.fused``, batch positions in the split, batch labels) -> weighted SE-CCL loss."""


def alignment_loss(sample_ids: np.ndarray, *, targets: Anchors | None, class_text: np.ndarray | None,
                   fused_dim: int, weight: float, temperature: float) -> AlignmentLoss | None:
    """The SE-CCL training term over a split whose samples have ``sample_ids``, or None if it has nothing to do.

    ``targets``: per-sample fused z to pull toward (the cloud's anchors on an edge, the edges' mean z on
    the cloud); only the split's samples that have one take part. ``class_text``: the class text
    anchors, applied to every sample through its label.
    """
    if weight == 0:
        return None
    classes = None if class_text is None else torch.from_numpy(project_class_anchors(class_text, fused_dim))
    per_sample = has_target = None
    if targets is not None and len(targets.sample_ids):
        positions, found = targets.lookup(np.asarray(sample_ids))
        if len(positions) >= 2:
            index = torch.from_numpy(positions)
            per_sample = torch.zeros(len(sample_ids), found.shape[1])
            per_sample[index] = torch.from_numpy(np.asarray(found, dtype=np.float32))
            has_target = torch.zeros(len(sample_ids), dtype=torch.bool)
            has_target[index] = True
    if classes is None and per_sample is None:
        return None

    def loss(output: Any, batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        fused = output.fused
        total = fused.sum() * 0.0
        if classes is not None:
            total = total + class_anchor_loss(fused, labels, classes, temperature)
        if per_sample is not None and has_target is not None:
            rows = has_target[batch]
            if int(rows.sum()) >= 2:
                total = total + sample_anchor_loss(fused[rows], per_sample[batch][rows], temperature)
        return weight * total

    return loss
