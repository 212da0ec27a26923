"""AMT, adaptive multimodal tuning: one device's work in one round, shared by the agent and the benchmark.

(a) Start from the global adapter. (b) The **update stage** trains the shared tensors; the difference
to the global adapter is the update to upload, with the fused ``z`` of a few public samples. With
``upload_stage="private"`` (the method, and the default) it trains on the device's private training
data together with its public shard: task loss + CCL on every sample, the class-anchor term on every
sample and the cloud's sample anchors on the public ids (SE-CCL, cloud -> edge), so the global model
learns from the whole fleet's data without seeing it. With ``"public"`` (the prototype's rule, kept to
compare against) it trains on the public shard only, and the private data reach nothing but the
personal model. (c) The **personal stage** loads the personal parts the device kept from its previous
round (its classifier head, by default) over the update-stage model and fine-tunes them alone on
private data, then evaluates the personalised model on a local held-out split. Personal parts never
leave the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from mlecs.data.split import LabelledSplit
from mlecs.learning.seccl import Anchors, alignment_loss
from mlecs.learning.supervised import (
    ExtraLoss,
    ProgressCallback,
    evaluate,
    fused_representations,
    train_supervised,
)
from mlecs.model.edge import EdgeModel

# The classifier head is the device's personal part: it learns the device's own label mix on top of the
# global representation, which it never changes ("fine-tune without overwriting the global knowledge").
# Keeping the extractors and connector slots personal too (and tuning everything in the personal stage)
# was measured worse: a kept extractor was tuned against last round's connector and LoRA. Personalised
# held-out accuracy, hard setting, tiny backbone, p = 0.4, seed 0, mean of rounds 5-7: 0.53 with the
# head alone against 0.33 (docs/method.md).
DEFAULT_PERSONAL_PREFIXES: tuple[str, ...] = ("head.",)

UploadStage = Literal["private", "public"]
UPLOAD_STAGES: tuple[str, ...] = get_args(UploadStage)


@dataclass(frozen=True)
class AmtRecipe:
    """How a device trains in a round; the coordinator sends it with the task."""

    upload_stage: UploadStage = "private"
    """Which data the uploaded change is learned on: ``private`` (private data + public shard, the
    method) or ``public`` (the public shard only, the prototype's rule)."""
    public_epochs: int = 2
    """Epochs of the update stage over the public shard; used only with ``upload_stage="public"``."""
    private_epochs: int = 2
    """``private``: epochs of the update stage over private data + public shard. ``public``: epochs of
    the personal stage (the prototype's private stage)."""
    personal_epochs: int = 1
    """Epochs of the personal stage with ``upload_stage="private"`` (0: evaluate the update-stage model
    with the kept personal parts, no fine-tuning)."""
    batch_size: int = 32
    learning_rate: float = 1e-3
    ccl_weight: float = 0.1
    """Weight of the cross-modal volume loss (both stages; acts only on samples with >= 2 modalities)."""
    ccl_temperature: float = 0.1
    seccl_weight: float = 0.5
    """Weight of the SE-CCL anchor terms (0 turns SE-CCL off)."""
    seccl_temperature: float = 0.1
    fused_upload_samples: int = 32
    """How many public samples' fused z the device uploads for edge -> cloud alignment (0: none)."""
    personal_prefixes: tuple[str, ...] = DEFAULT_PERSONAL_PREFIXES
    """Tensor-name prefixes of the personal parts: kept on the device from round to round, and the only
    tensors the personal stage trains."""

    def __post_init__(self) -> None:
        if self.upload_stage not in UPLOAD_STAGES:
            raise ValueError(f"upload_stage must be one of {', '.join(UPLOAD_STAGES)}, got {self.upload_stage!r}")
        for name in ("public_epochs", "private_epochs", "personal_epochs", "batch_size"):
            value = getattr(self, name)
            lowest = 1 if name == "batch_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
        update_epochs = "public_epochs" if self.upload_stage == "public" else "private_epochs"
        if getattr(self, update_epochs) < 1:
            raise ValueError(f"{update_epochs} must be at least 1 with upload_stage={self.upload_stage!r}: "
                             "that stage produces the update")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        for name in ("ccl_weight", "seccl_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("ccl_temperature", "seccl_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.fused_upload_samples < 0:
            raise ValueError(f"fused_upload_samples must be >= 0, got {self.fused_upload_samples!r}")


@dataclass(frozen=True)
class AmtData:
    """A device's data: its public shard, private training data and a private held-out split."""

    modalities: frozenset[str]
    public: LabelledSplit
    private_train: LabelledSplit
    private_heldout: LabelledSplit


@dataclass(frozen=True, eq=False)
class AmtResult:
    delta: dict[str, np.ndarray]
    """Update-stage tensors minus the global ones: the update to upload."""
    fused_ids: np.ndarray
    """Public sample ids whose fused z is uploaded (int64 [k])."""
    fused: np.ndarray
    """Their fused z after the update stage, float32 [k, fused_dim]."""
    personal: dict[str, np.ndarray]
    """The personal parts to keep for the next round."""
    metrics: dict[str, float]
    public_samples: int
    private_samples: int
    update_samples: int
    """Samples the uploaded change was learned on: the sample count an aggregator weighs it by."""


def _anchor_loss(model: EdgeModel, split: LabelledSplit, anchors: Anchors | None, recipe: AmtRecipe,
                 use_sample_anchors: bool) -> ExtraLoss | None:
    """The SE-CCL term for a stage (cloud -> edge), or None when it has nothing to act on."""
    if anchors is None:
        return None
    return alignment_loss(split.sample_ids, targets=anchors if use_sample_anchors else None,
                          class_text=anchors.text, fused_dim=model.config.fused_dim,
                          weight=recipe.seccl_weight, temperature=recipe.seccl_temperature)


def run_amt_round(
    model: EdgeModel,
    data: AmtData,
    global_tensors: Mapping[str, np.ndarray],
    *,
    recipe: AmtRecipe,
    seed: int,
    anchors: Anchors | None = None,
    personal: Mapping[str, np.ndarray] | None = None,
    progress: ProgressCallback | None = None,
) -> AmtResult:
    """Runs (a)-(c) on ``model`` (which it overwrites); deterministic given ``seed``."""
    mods = data.modalities
    # (a) the global adapter
    model.load_shared_state({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in global_tensors.items()})
    # (b) update stage: the shared tensors only; its result is what travels
    if recipe.upload_stage == "private":
        # The public shard rides along: it is where the cloud's sample anchors apply (SE-CCL).
        parts = [part for part in (data.private_train, data.public) if len(part)] or [data.private_train]
        update_split = type(parts[0]).concatenate(parts)
        update_epochs, personal_epochs = recipe.private_epochs, recipe.personal_epochs
        personal_split = data.private_train
    else:
        update_split, update_epochs = data.public, recipe.public_epochs
        personal_split, personal_epochs = data.private_train, recipe.private_epochs
    update = train_supervised(
        model, update_split, mods, epochs=update_epochs, batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate, seed=seed, parameters="shared",
        ccl_weight=recipe.ccl_weight, ccl_temperature=recipe.ccl_temperature,
        extra_loss=_anchor_loss(model, update_split, anchors, recipe, use_sample_anchors=True), progress=progress,
    )
    trained = model.shared_state()
    delta = {name: (value.numpy() - np.asarray(global_tensors[name], dtype=np.float32)).astype(np.float32)
             for name, value in trained.items()}
    fused_ids, fused = _fused_sample(model, data, recipe.fused_upload_samples, seed)

    # (c) personal stage: personal parts from last round (if any) over the update-stage model
    if personal:
        current = model.personal_state()
        # Only what this recipe calls personal: a file kept under another rule (an agent upgraded from
        # when extractors were personal too) must not put stale extractors under the new global model.
        current.update({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in personal.items()
                        if k in current and k.startswith(recipe.personal_prefixes)
                        and tuple(current[k].shape) == tuple(np.shape(v))})
        model.load_personal_state(current)
    metrics = {"update_loss": update.loss, "update_accuracy": update.accuracy}
    if personal_epochs and len(personal_split):
        tuned = train_supervised(
            model, personal_split, mods, epochs=personal_epochs, batch_size=recipe.batch_size,
            learning_rate=recipe.learning_rate, seed=seed + 1,
            parameters=model.shared_parameters(recipe.personal_prefixes),
            ccl_weight=recipe.ccl_weight, ccl_temperature=recipe.ccl_temperature,
            extra_loss=_anchor_loss(model, personal_split, anchors, recipe, use_sample_anchors=False),
            progress=progress,
        )
        metrics.update(personal_loss=tuned.loss, personal_train_accuracy=tuned.accuracy)
    if len(data.private_heldout):
        metrics["personal_accuracy"] = evaluate(model, data.private_heldout, mods)
    kept = {name: value.numpy() for name, value in model.personal_state().items()
            if name.startswith(recipe.personal_prefixes)}
    return AmtResult(delta=delta, fused_ids=fused_ids, fused=fused, personal=kept, metrics=metrics,
                     public_samples=len(data.public), private_samples=len(data.private_train),
                     update_samples=len(update_split))


def _fused_sample(model: EdgeModel, data: AmtData, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The fused z of up to ``count`` public samples, chosen by seed (edge -> cloud alignment)."""
    if count == 0 or len(data.public) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, model.config.fused_dim), dtype=np.float32)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(data.public))[:count])
    subset = data.public.subset(chosen)
    z = fused_representations(model, subset, data.modalities).numpy().astype(np.float32)
    return subset.sample_ids.astype(np.int64), z
