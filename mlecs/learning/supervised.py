"""Supervised training and evaluation of an :class:`EdgeModel` on a labelled split (``mlecs.data.split``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from mlecs.data.split import LabelledSplit
from mlecs.learning.ccl import ccl_loss
from mlecs.model.edge import EdgeModel, ModelOutput

ProgressCallback = Callable[[int, int, float], None]
"""Called after every optimiser step with (step, total_steps, batch loss); steps count from 1."""

ExtraLoss = Callable[[ModelOutput, torch.Tensor, torch.Tensor], torch.Tensor]
"""An extra training term: (model output, batch positions in the split, batch labels) -> scalar loss."""


@dataclass(frozen=True)
class TrainStats:
    """What a training run achieved: loss and accuracy over its last epoch."""

    loss: float
    """Mean cross-entropy over the last epoch."""
    accuracy: float
    """Training accuracy over the last epoch (measured in train mode, on the fly)."""
    samples: int
    """Number of distinct training samples (the weight an aggregator gives this run)."""
    seconds: float
    """Wall-clock time of the run."""


Presence = dict[str, torch.Tensor] | None
"""Per-sample presence masks of the modalities fed (bool [N]); None when every sample has every one."""


def to_inputs(split: LabelledSplit, modalities: Iterable[str]) -> dict[str, torch.Tensor]:
    """Wraps the split's arrays of the given modalities as tensors (sharing memory with the arrays)."""
    arrays = split.input_arrays()
    missing = sorted(str(m) for m in modalities if str(m) not in arrays)
    if missing:
        raise ValueError(f"the data has no modality {', '.join(missing)} (it has {', '.join(sorted(arrays))})")
    return {str(m): torch.from_numpy(arrays[str(m)]) for m in modalities}


def presence_of(split: LabelledSplit, modalities: Iterable[str]) -> Presence:
    """The presence masks of ``modalities`` in ``split`` (None when no sample lacks any of them)."""
    masks = split.presence()
    chosen = {str(m): torch.from_numpy(np.asarray(masks[str(m)], dtype=bool)) for m in modalities
              if str(m) in masks and not np.all(masks[str(m)])}
    if not chosen:
        return None
    return {str(m): chosen.get(str(m), torch.ones(len(split), dtype=torch.bool)) for m in modalities}


def _rows(presence: Presence, rows: torch.Tensor | slice) -> Mapping[str, torch.Tensor] | None:
    return None if presence is None else {m: mask[rows] for m, mask in presence.items()}


def _check_modalities(model: EdgeModel, modalities: frozenset[str]) -> None:
    if not modalities:
        raise ValueError("modalities must name at least one modality")
    missing = modalities - model.modalities
    if missing:
        raise ValueError(f"model has no extractor for {sorted(str(m) for m in missing)}")


def train_supervised(
    model: EdgeModel,
    split: LabelledSplit,
    modalities: frozenset[str],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    parameters: Literal["shared", "trainable"] | Sequence[nn.Parameter] = "trainable",
    weight_decay: float = 0.01,
    ccl_weight: float = 0.0,
    ccl_temperature: float = 0.1,
    extra_loss: ExtraLoss | None = None,
    progress: ProgressCallback | None = None,
) -> TrainStats:
    """Trains with cross-entropy and AdamW, feeding only ``modalities``; deterministic given ``seed``.

    ``parameters="shared"`` updates only the tensors that travel (``model.shared_parameters()``);
    ``"trainable"`` updates everything not frozen; a list of parameters updates just those (gradients
    then stop where nothing below needs one, so training a head alone costs little more than inference).
    The caller's global RNG state is left untouched.
    ``ccl_weight > 0`` adds the cross-modal volume loss (``mlecs.learning.ccl``) on the extractor
    features; it only acts when at least two modalities are fed. ``extra_loss`` adds any other term
    (SE-CCL's anchor alignment, for one) computed from the batch's output.
    """
    return train_groups(model, [(split, modalities)], epochs=epochs, batch_size=batch_size,
                        learning_rate=learning_rate, seed=seed, parameters=parameters, weight_decay=weight_decay,
                        ccl_weight=ccl_weight, ccl_temperature=ccl_temperature, extra_loss=extra_loss,
                        progress=progress)


def train_groups(
    model: EdgeModel,
    groups: Sequence[tuple[LabelledSplit, frozenset[str]]],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    parameters: Literal["shared", "trainable"] | Sequence[nn.Parameter] = "trainable",
    weight_decay: float = 0.01,
    ccl_weight: float = 0.0,
    ccl_temperature: float = 0.1,
    extra_loss: ExtraLoss | None = None,
    progress: ProgressCallback | None = None,
    after_epoch: Callable[[int], bool] | None = None,
) -> TrainStats:
    """:func:`train_supervised` over several splits, each fed its own modalities (a pooled data set whose
    samples miss modalities group by group). Every batch comes from one group; the batches of all groups
    are shuffled together each epoch. ``extra_loss`` needs a single group (it indexes into one split).
    ``after_epoch(epoch)`` (epochs count from 1) runs after every epoch, with the optimiser's state kept
    across epochs; it returns True to stop early (e.g. once a curve has flattened).
    """
    groups = [(split, frozenset(mods)) for split, mods in groups if len(split)]
    if not groups:
        raise ValueError("split is empty: nothing to train on")
    for _, mods in groups:
        _check_modalities(model, mods)
    if epochs < 1 or batch_size < 1 or learning_rate <= 0:
        raise ValueError(
            f"epochs, batch_size and learning_rate must be positive, got {epochs}, {batch_size}, {learning_rate}"
        )
    if ccl_weight < 0:
        raise ValueError(f"ccl_weight must be >= 0, got {ccl_weight}")
    if extra_loss is not None and len(groups) > 1:
        raise ValueError("extra_loss needs a single group")
    params = _parameters(model, parameters)
    fed = [(to_inputs(split, mods), torch.from_numpy(split.labels), presence_of(split, mods)) for split, mods in groups]
    # The fused kernel updates every tensor in one pass: 1.6 ms per step here against 8.4 ms for the
    # default per-tensor loop (37 small tensors), about a tenth of a training step on this CPU.
    optimiser = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=True)
    size = sum(len(split) for split, _ in groups)
    total_steps = epochs * sum(-(-len(split) // batch_size) for split, _ in groups)
    started = time.perf_counter()
    was_training = model.training
    model.train()
    try:
        with _only_these_learn(model, params):
            loss_sum, correct = _run_epochs(
                model, fed, optimiser, epochs, batch_size, seed, total_steps, progress,
                (ccl_weight, ccl_temperature), extra_loss, after_epoch,
            )
    finally:
        model.train(was_training)
    return TrainStats(
        loss=loss_sum / size,
        accuracy=correct / size,
        samples=size,
        seconds=time.perf_counter() - started,
    )


def _parameters(model: EdgeModel, parameters: str | Sequence[nn.Parameter]) -> list[nn.Parameter]:
    if parameters == "shared":
        return model.shared_parameters()
    if parameters == "trainable":
        return [p for p in model.parameters() if p.requires_grad]
    if isinstance(parameters, str):
        raise ValueError(f"parameters must be 'shared', 'trainable' or a list of parameters, got {parameters!r}")
    chosen = list(parameters)
    if not chosen:
        raise ValueError("no parameters to train")
    return chosen


@contextmanager
def _only_these_learn(model: EdgeModel, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Turns off gradients for every trainable parameter not in ``params`` (so backward stops early)."""
    chosen = {id(p) for p in params}
    paused = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    for p in paused:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in paused:
            p.requires_grad_(True)


def _epoch_batches(sizes: list[int], batch_size: int, shuffler: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """One epoch's (group, positions) batches: each group shuffled and cut, then the batches interleaved."""
    batches = [(group, batch) for group, size in enumerate(sizes)
               for batch in torch.randperm(size, generator=shuffler).split(batch_size)]
    if len(sizes) == 1:
        return batches  # one group: the plain shuffled pass
    order = torch.randperm(len(batches), generator=shuffler).tolist()
    return [batches[i] for i in order]


def _run_epochs(
    model: EdgeModel,
    fed: list[tuple[dict[str, torch.Tensor], torch.Tensor, Presence]],
    optimiser: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int,
    total_steps: int,
    progress: ProgressCallback | None,
    ccl: tuple[float, float] = (0.0, 0.1),
    extra_loss: ExtraLoss | None = None,
    after_epoch: Callable[[int], bool] | None = None,
) -> tuple[float, int]:
    """Runs the optimisation loop; returns (summed loss, correct predictions) of the last epoch."""
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    loss_sum, correct = 0.0, 0
    sizes = [labels.shape[0] for _, labels, _ in fed]
    # Dropout draws from the global RNG: fork it so training is reproducible and the caller's stream
    # is not consumed. Shuffling has its own generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shuffler = torch.Generator().manual_seed(seed)
        for epoch in range(1, epochs + 1):
            loss_sum, correct = 0.0, 0
            for group, batch in _epoch_batches(sizes, batch_size, shuffler):
                inputs, labels, presence = fed[group]
                present = _rows(presence, batch)
                output = model({m: x[batch] for m, x in inputs.items()}, present)
                logits = output.logits
                loss = loss_fn(logits, labels[batch])
                if ccl[0] > 0 and len(output.features) >= 2:
                    every = torch.ones(len(batch), dtype=torch.bool)
                    masks = {m: present[m] if present is not None else every for m in output.features}
                    loss = loss + ccl[0] * ccl_loss(dict(output.features), masks, ccl[1])
                if extra_loss is not None:
                    loss = loss + extra_loss(output, batch, labels[batch])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                loss_sum += float(loss.detach()) * len(batch)
                correct += int((logits.detach().argmax(dim=1) == labels[batch]).sum())
                step += 1
                if progress is not None:
                    progress(step, total_steps, float(loss.detach()))
            if after_epoch is not None and after_epoch(epoch):
                break
    return loss_sum, correct


def evaluate(model: EdgeModel, split: LabelledSplit, modalities: frozenset[str], batch_size: int = 256) -> float:
    """Returns the model's accuracy on ``split`` when fed only ``modalities`` (no gradients, eval mode).

    A sample lacking all of ``modalities`` is still classified (from nothing): the accuracy counts every sample.
    """
    _check_modalities(model, modalities)
    if len(split) == 0:
        raise ValueError("split is empty: nothing to evaluate")
    inputs = to_inputs(split, modalities)
    presence = presence_of(split, modalities)
    labels = torch.from_numpy(split.labels)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                rows = slice(start, start + batch_size)
                batch = {m: x[rows] for m, x in inputs.items()}
                predicted = model(batch, _rows(presence, rows)).logits.argmax(dim=1)
                correct += int((predicted == labels[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(split)


def fused_representations(model: EdgeModel, split: LabelledSplit, modalities: frozenset[str],
                          batch_size: int = 256) -> torch.Tensor:
    """The fused ``z`` [len(split), fused_dim] of every sample, fed only ``modalities`` (eval mode, no grad)."""
    _check_modalities(model, modalities)
    inputs = to_inputs(split, modalities)
    presence = presence_of(split, modalities)
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                rows = slice(start, start + batch_size)
                parts.append(model({m: x[rows] for m, x in inputs.items()}, _rows(presence, rows)).fused)
    finally:
        model.train(was_training)
    if not parts:
        return torch.zeros(0, model.config.fused_dim)
    return torch.cat(parts)
