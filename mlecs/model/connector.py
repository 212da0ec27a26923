"""C: fuses the present modalities' features into z and turns z into soft-prompt tokens for the backbone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

# Soft tokens are scaled down so they stay small next to the backbone's own position embeddings: the
# frozen pretrained LM then starts in a smooth regime where its gradients agree from batch to batch
# (measured cosine ~0.9 between two half-batches' extractor gradients, against ~0.1 unscaled, where
# training stalled at chance for many epochs). A constant, not a parameter: nothing to learn or ship.
TOKEN_SCALE = 0.02


class SlotProjection(nn.Module):
    """Projects one modality's features into its slot of the fused input, normalised."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(feature_dim, feature_dim)
        self.norm = nn.LayerNorm(feature_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(features))


class FusionCore(nn.Module):
    """The modality-independent part of C: fusion of the slots + mask into z, and z -> soft tokens.

    Soft tokens are cheap: z is cut into ``num_tokens`` chunks that share one linear map to the
    backbone width, plus a learned embedding per token position (far fewer parameters than a
    ``fused_dim -> num_tokens * hidden`` projection).
    """

    def __init__(self, num_slots: int, feature_dim: int, fused_dim: int, num_tokens: int, hidden_size: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.fuse = nn.Linear(num_slots * (feature_dim + 1), fused_dim)
        self.fuse_norm = nn.LayerNorm(fused_dim)
        self.token_proj = nn.Linear(fused_dim // num_tokens, hidden_size)
        self.token_embed = nn.Parameter(torch.randn(num_tokens, hidden_size) * 0.02)

    def fuse_slots(self, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fuse_norm(nn.functional.gelu(self.fuse(torch.cat([slots, mask], dim=1))))

    def soft_tokens(self, fused: torch.Tensor) -> torch.Tensor:
        chunks = fused.view(fused.shape[0], self.num_tokens, -1)
        return TOKEN_SCALE * (self.token_proj(chunks) + self.token_embed)


class Connector(nn.Module):
    """Per-modality slot projections (only for the modalities held) around a shared :class:`FusionCore`.

    ``slot_order`` lists every modality of the federation (sorted): each has a fixed slot in the fused
    input, so shapes agree on every device whichever modalities it holds.
    """

    def __init__(self, slot_order: Sequence[str], slots: Mapping[str, SlotProjection], core: FusionCore,
                 feature_dim: int) -> None:
        super().__init__()
        self.slot_order = tuple(slot_order)
        self.slots = nn.ModuleDict({m: slots[m] for m in self.slot_order if m in slots})
        self.core = core
        self.feature_dim = feature_dim

    def forward(self, features: Mapping[str, torch.Tensor],
                present: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (fused z [N, fused_dim], soft tokens [N, T, hidden]) from the present modalities' features.

        A missing modality's slot is zero and its mask bit 0, so the fusion layer can tell "absent"
        from any real feature value. ``present[m]`` (bool [N]) marks the samples that have modality ``m``
        when samples of one batch differ; a modality given without one is present in every sample.
        """
        batch = next(iter(features.values())).shape[0]
        reference = next(iter(features.values()))
        slots, mask = [], []
        for modality in self.slot_order:
            if modality in features:
                has = present.get(modality) if present is not None else None
                bit = (torch.ones(batch, 1, dtype=reference.dtype, device=reference.device) if has is None
                       else has.to(reference.dtype).reshape(batch, 1))
                slots.append(self.slots[modality](features[modality]) * bit)
                mask.append(bit)
            else:
                slots.append(reference.new_zeros(batch, self.feature_dim))
                mask.append(reference.new_zeros(batch, 1))
        fused = self.core.fuse_slots(torch.cat(slots, dim=1), torch.cat(mask, dim=1))
        return fused, self.core.soft_tokens(fused)
