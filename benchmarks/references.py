"""The references that bound the learning benchmark's federations, trained through the same model code.

* ``centralised``: one model (the devices' architecture) on every client's training data pooled (public
  shard + private training data), each sample fed the modalities its client has: the best a federation
  can reach under that missing pattern.
* ``centralised-full``: the same pooled data with every modality.
* ``cloud-alone``: the cloud's model on the public set only (task loss, CCL and the class text anchors,
  as the cloud tunes itself, minus anything from the devices): what the cloud could do without a fleet.

Each trains until its test-accuracy curve flattens (the rule the federations use, one epoch standing for
one round) or ``config.rounds`` epochs; the reported accuracy is the mean over the last epochs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from benchmarks.federation_sim import SimConfig, SimResult, client_data, eval_sets, has_flattened
from mlecs.data.avmnist import AVMnist
from mlecs.data.split import LabelledSplit
from mlecs.learning import evaluate
from mlecs.learning.seccl import alignment_loss
from mlecs.learning.supervised import train_groups
from mlecs.modality import Modality
from mlecs.model import build_edge_model

REFERENCES: tuple[str, ...] = ("centralised", "centralised-full", "cloud-alone")
P_INDEPENDENT: frozenset[str] = frozenset({"centralised-full", "cloud-alone"})
"""References that do not depend on the missing pattern: run once per seed, compared at every p."""


def pooled_groups(data: AVMnist, config: SimConfig, p: float, seed: int,
                  full: bool) -> list[tuple[LabelledSplit, frozenset[str]]]:
    """Every client's public shard and private training data, grouped by the modalities fed."""
    by_modalities: dict[frozenset[str], list[LabelledSplit]] = defaultdict(list)
    for client in client_data(data, config, p, seed):
        modalities = frozenset(Modality) if full else client.modalities
        by_modalities[modalities] += [client.public, client.private_train]
    return [(type(parts[0]).concatenate(parts), modalities) for modalities, parts in sorted(
        by_modalities.items(), key=lambda item: sorted(str(m) for m in item[0]))]


def run_reference(data: AVMnist, name: str, p: float, seed: int, config: SimConfig,
                  text_anchors: np.ndarray | None, say: Callable[[str], None] = lambda _: None) -> SimResult:
    """Trains one reference model and returns its curve as a :class:`SimResult` (an epoch per "round")."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; choose from {', '.join(REFERENCES)}")
    started = time.perf_counter()
    every: frozenset[str] = frozenset(Modality)
    test, _ = eval_sets(data, config)
    recipe = config.recipe
    extra = None
    if name == "cloud-alone":
        model = build_edge_model(config.cloud_model or config.model, every, seed)
        publics = [c.public for c in client_data(data, config, p, seed)]
        public = type(publics[0]).concatenate(publics)
        groups = [(public, every)]
        extra = alignment_loss(public.sample_ids, targets=None, class_text=text_anchors,
                               fused_dim=model.config.fused_dim, weight=config.cloud.seccl_weight,
                               temperature=config.cloud.seccl_temperature)
    else:
        model = build_edge_model(config.model, every, seed)
        groups = pooled_groups(data, config, p, seed, full=name == "centralised-full")
    history: list[dict[str, float]] = []

    def after_epoch(epoch: int) -> bool:
        history.append({"round": float(epoch), "global_accuracy": evaluate(model, test, every),
                        "seconds": time.perf_counter() - started})
        say(f"  epoch {epoch}: test {history[-1]['global_accuracy']:.3f}")
        return config.stop_when_flat and has_flattened([r["global_accuracy"] for r in history])

    train_groups(model, groups, epochs=config.rounds, batch_size=recipe.batch_size,
                 learning_rate=recipe.learning_rate, seed=seed * 1_000_003 + 17, parameters="shared",
                 ccl_weight=recipe.ccl_weight, ccl_temperature=recipe.ccl_temperature, extra_loss=extra,
                 after_epoch=after_epoch)
    final = float(np.mean([r["global_accuracy"] for r in history[-config.final_window:]]))
    return SimResult(global_accuracy=final, client_accuracy_mean=float("nan"), upload_bytes_per_client=0.0,
                     unseen_speaker_accuracy=None, cloud_accuracy=final if name == "cloud-alone" else None,
                     history=history, seconds=time.perf_counter() - started)
