"""CCL: volume-based cross-modal contrastive loss (in the spirit of GRAM).

For one sample with k >= 2 present modality embeddings (L2-normalised, the columns of A), the
volume ``sqrt(det(A^T A))`` of the parallelotope they span is 0 when they coincide and 1 when they are
orthonormal: a small volume means aligned. The contrastive form scores every (anchor of sample i,
other modalities of sample j) combination with ``-Vol/τ`` and asks each sample to pick itself among
the batch, in both directions (anchor -> others and others -> anchor). A sample with one modality
has nothing to align and is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

# det(A^T A) of nearly parallel unit vectors can come out slightly negative in floating point, and
# sqrt has an infinite slope at 0; clamping keeps the gradient finite.
_MIN_GRAM_DET = 1e-8


def volume(vectors: torch.Tensor) -> torch.Tensor:
    """Volume spanned by the k vectors on the second-to-last axis: [..., k, d] -> [...] (normalised first)."""
    a = F.normalize(vectors, dim=-1)
    gram = a @ a.transpose(-1, -2)
    return torch.sqrt(torch.linalg.det(gram).clamp(min=_MIN_GRAM_DET))


def pairwise_volumes(anchor: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N, N] volumes of (anchor of sample i, every other modality of sample j)."""
    n = anchor.shape[0]
    stacked = torch.stack([F.normalize(o, dim=-1) for o in others], dim=1)  # [N, k-1, d]
    rows = F.normalize(anchor, dim=-1)[:, None, None, :].expand(n, n, 1, anchor.shape[-1])
    cols = stacked[None, :, :, :].expand(n, n, *stacked.shape[1:])
    return volume(torch.cat([rows, cols], dim=2))


def ccl_loss(embeddings: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor],
             temperature: float = 0.1) -> torch.Tensor:
    """The symmetric volume-contrastive loss over a batch, averaged over presence patterns.

    ``embeddings[m]`` is [N, d] for modality m (rows of absent samples are ignored); ``present[m]`` is a
    boolean [N]. Samples are grouped by which modalities they have; every group with at least two
    modalities and two samples contributes. Returns 0 (with a gradient path) when none does.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    names = sorted(embeddings)
    if not names:
        raise ValueError("no embeddings given")
    mask = torch.stack([present[m].bool() for m in names], dim=1)  # [N, M]
    losses = []
    for pattern in torch.unique(mask, dim=0):
        have = [m for m, on in zip(names, pattern.tolist(), strict=True) if on]
        rows = (mask == pattern).all(dim=1).nonzero(as_tuple=True)[0]
        if len(have) < 2 or len(rows) < 2:
            continue
        anchor = embeddings[have[0]][rows]
        others = [embeddings[m][rows] for m in have[1:]]
        logits = -pairwise_volumes(anchor, others) / temperature
        target = torch.arange(len(rows), device=logits.device)
        losses.append(0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)))
    if not losses:
        return sum(e.sum() * 0.0 for e in embeddings.values())  # type: ignore[return-value]
    return torch.stack(losses).mean()
