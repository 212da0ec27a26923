"""One federation in one process: the agents' AMT and the coordinator's aggregation and anchors, minus the network.

Every learning step is the code the services run (``mlecs.learning.amt``, ``mlecs.learning.cloud``,
``mlecs.aggregation``); only gRPC, the database and the blob store are left out. A method is a set of
switches on that code (see ``METHODS``). ``SimConfig.poisoning`` adds attacking clients and the
coordinator's robust defences (``benchmarks.adversary``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from benchmarks.adversary import (
    ADAPTIVE_ATTACKS,
    DEFENCES,
    Poisoning,
    aggregate_round,
    alie_delta,
    choose_attackers,
    claimed_samples,
    poison_delta,
    round_record,
)
from mlecs.aggregation import ClientUpdate, fedavg_weights, mma_weights
from mlecs.aggregation.claims import capped_sample_counts
from mlecs.aggregation.lora_exact import average_lora_products
from mlecs.aggregation.quality import agreement_weights, anchor_agreement
from mlecs.codec import CodecKind, encode_tensors
from mlecs.data.avmnist import AVMnist, AVMnistSplit
from mlecs.data.partition import MissingScheme, PartitionSpec, plan_shards
from mlecs.learning import evaluate
from mlecs.learning.amt import AmtData, AmtRecipe, UploadStage, run_amt_round
from mlecs.learning.cloud import CloudRecipe, generate_anchors, mean_edge_fused, tune_cloud
from mlecs.learning.seccl import Anchors
from mlecs.modality import Modality
from mlecs.model import EdgeModel, ModelConfig, build_edge_model


@dataclass(frozen=True)
class Method:
    """The switches that make a method out of the shared code."""

    federated: bool = True
    zero_fill: bool = False
    """Clients missing a modality feed zeros for it through a full model (the FedAvg baseline)."""
    aggregation: str = "mma"
    """``mma``: modality-aware weights (with the anchor-agreement factor when SE-CCL is on); ``fedavg``."""
    ccl: bool = True
    seccl: bool = True
    exact_lora: bool = False
    """Average the clients' B·A products and re-factorise (``lora_mode=exact``) instead of A and B apart."""
    upload_stage: UploadStage = "private"
    """``private``: the upload is learned on the private data (the method); ``public``: the prototype's rule."""
    small_language_model: bool = True
    """False replaces the backbone with the random 2-layer ``tiny`` one, on the devices and the cloud."""


METHODS: dict[str, Method] = {
    "local": Method(federated=False, ccl=False, seccl=False),
    "fedavg": Method(zero_fill=True, aggregation="fedavg", ccl=False, seccl=False),
    "mlecs": Method(),
    "mlecs-no-ccl": Method(ccl=False),
    "mlecs-no-seccl": Method(seccl=False),
    "mlecs-no-mma": Method(aggregation="fedavg"),
    "mlecs-no-slm": Method(small_language_model=False),
    "mlecs-public-upload": Method(upload_stage="public"),
    "mlecs-exact-lora": Method(exact_lora=True),
}
ABLATIONS: tuple[str, ...] = ("mlecs-no-ccl", "mlecs-no-seccl", "mlecs-no-mma", "mlecs-no-slm", "mlecs-public-upload")
DEFAULT_METHODS: tuple[str, ...] = ("local", "fedavg", "mlecs")
"""The methods of the headline grid; the ablations and ``mlecs-exact-lora`` run when named."""

TINY_BACKBONE = ModelConfig(backbone="tiny")


@dataclass(frozen=True)
class SimConfig:
    num_clients: int = 10
    rounds: int = 10
    """Rounds to run; with ``stop_when_flat``, the most to run."""
    alpha: float = 0.5
    public_fraction: float = 0.2
    heldout_fraction: float = 0.2
    recipe: AmtRecipe = field(default_factory=AmtRecipe)
    cloud: CloudRecipe = field(default_factory=CloudRecipe)
    model: ModelConfig = field(default_factory=ModelConfig)
    """The devices' model (and the global model's)."""
    cloud_model: ModelConfig | None = None
    """The cloud's model when it differs from the devices' (e.g. all six MiniLM layers); None: the same."""
    missing: MissingScheme = "alternate"
    """Which modality the clients counted by p lack (``mlecs.data.partition.MISSING_SCHEMES``)."""
    stop_when_flat: bool = False
    """Stop once the global accuracy has flattened (see :func:`has_flattened`), before ``rounds``."""
    final_window: int = 3
    """The reported accuracies are the means over this many last rounds (one evaluation is noisy)."""
    agreement_temperature: float | None = 0.2
    """MMA's noise factor softness; None leaves the factor out (modality count x samples only)."""
    unseen_speaker: int | None = 0
    """Speaker left out of every client's data; the global model is also evaluated on its clips."""
    poisoning: Poisoning = field(default_factory=Poisoning)
    """Attacking clients and the aggregation's defence; the default has neither (plain MMA/FedAvg)."""


def benchmark_config(clients: int, rounds: int, model: str | ModelConfig,
                     cloud_model: ModelConfig | None = None) -> SimConfig:
    """The recipe every benchmark built on this simulation runs, so the learning and poisoning benchmarks
    measure the same federation: three epochs over private data + public shard for the update (one took
    half again as long to reach the same accuracy, counting the per-round cloud work), one epoch of
    personal tuning (the prototype's rule: 5 epochs over the public shard), batch 16, lr 1e-3."""
    devices = ModelConfig(backbone=model) if isinstance(model, str) else model  # type: ignore[arg-type]
    return SimConfig(num_clients=clients, rounds=rounds, model=devices, cloud_model=cloud_model,
                     recipe=replace(AmtRecipe(), public_epochs=5, private_epochs=3, personal_epochs=1,
                                    batch_size=16))


@dataclass
class SimResult:
    global_accuracy: float
    """Test accuracy of the global model, mean of the last ``final_window`` rounds."""
    client_accuracy_mean: float
    """Mean personalised accuracy on the clients' held-out data, mean of the last rounds."""
    upload_bytes_per_client: float
    unseen_speaker_accuracy: float | None
    cloud_accuracy: float | None
    """The cloud model's test accuracy, mean of the last rounds (None: no cloud tuning)."""
    history: list[dict[str, float]]
    """One record per round: ``round``, ``global_accuracy``, ``seconds`` (since the start), and where the
    round's time went: ``devices_s`` (every client's AMT), ``cloud_s`` (tuning and anchors), ``evaluation_s``
    (the global model on the test split), ..."""
    seconds: float
    attackers: tuple[int, ...] = ()
    """Indices of the clients that poisoned their updates (``config.poisoning``)."""

    @property
    def rounds(self) -> int:
        return len(self.history)

    def to_95(self) -> tuple[int, float]:
        """(rounds, seconds) until the global accuracy first reached 95% of its final value."""
        for record in self.history:
            if record["global_accuracy"] >= 0.95 * self.global_accuracy:
                return int(record["round"]), float(record["seconds"])
        return self.rounds, self.seconds


FLAT_MIN_ROUNDS = 6
FLAT_WINDOW = 3
FLAT_DELTA = 0.005


def has_flattened(curve: list[float], window: int = FLAT_WINDOW, delta: float = FLAT_DELTA,
                  min_rounds: int = FLAT_MIN_ROUNDS) -> bool:
    """Whether a learning curve has flattened: the mean of its last ``window`` points is less than
    ``delta`` above the mean of the ``window`` before them (after at least ``min_rounds`` points)."""
    if len(curve) < max(min_rounds, 2 * window):
        return False
    return float(np.mean(curve[-window:])) - float(np.mean(curve[-2 * window:-window])) < delta


def _tail_mean(history: list[dict[str, float]], key: str, window: int) -> float | None:
    values = [r[key] for r in history[-window:] if key in r and np.isfinite(r[key])]
    return float(np.mean(values)) if values else None


def _zero_filled(split: AVMnistSplit, modalities: frozenset[str]) -> AVMnistSplit:
    images = split.images if Modality.IMAGE in modalities else np.zeros_like(split.images)
    audio = split.audio if Modality.AUDIO in modalities else np.zeros_like(split.audio)
    return replace(split, images=images, audio=audio)


def client_data(data: AVMnist, config: SimConfig, p: float, seed: int, zero_fill: bool = False) -> list[AmtData]:
    """The clients' data for one seed: public shard, private training data and held-out split each."""
    train = data.train
    keep = np.arange(len(train))
    if config.unseen_speaker is not None:
        keep = keep[train.speaker != config.unseen_speaker]
    train = train.subset(keep)
    spec = PartitionSpec(num_clients=config.num_clients, scheme="speaker-dirichlet", alpha=config.alpha,
                         public_fraction=config.public_fraction, seed=seed, missing_scheme=config.missing)
    clients = []
    for shard in plan_shards(train, spec, missing_fraction=p):
        private = np.random.default_rng([seed, shard.client_index]).permutation(shard.private_index)
        n_heldout = max(1, round(len(private) * config.heldout_fraction))
        parts = [train.subset(shard.public_index), train.subset(np.sort(private[n_heldout:])),
                 train.subset(np.sort(private[:n_heldout]))]
        modalities = shard.modalities
        if zero_fill:
            parts = [_zero_filled(part, modalities) for part in parts]
            modalities = frozenset(Modality)
        clients.append(AmtData(modalities, *parts))
    return clients


def eval_sets(data: AVMnist, config: SimConfig) -> tuple[AVMnistSplit, AVMnistSplit | None]:
    test = data.test
    if config.unseen_speaker is None:
        return test, None
    unseen_train = data.train.subset(np.nonzero(data.train.speaker == config.unseen_speaker)[0])
    unseen_test = test.subset(np.nonzero(test.speaker == config.unseen_speaker)[0])
    seen_test = test.subset(np.nonzero(test.speaker != config.unseen_speaker)[0])
    unseen = replace(
        unseen_train,
        images=np.concatenate([unseen_train.images, unseen_test.images]),
        audio=np.concatenate([unseen_train.audio, unseen_test.audio]),
        labels=np.concatenate([unseen_train.labels, unseen_test.labels]),
        speaker=np.concatenate([unseen_train.speaker, unseen_test.speaker]),
        sample_ids=np.concatenate([unseen_train.sample_ids, unseen_test.sample_ids]),
    )
    return seen_test, unseen


def _update_bytes(delta: dict[str, np.ndarray], fused: np.ndarray) -> int:
    tensors = dict(delta)
    if len(fused):
        tensors["fused.z"] = fused
    return len(encode_tensors(tensors, CodecKind.FP16))


def simulate(data: AVMnist, method_name: str, p: float, seed: int, config: SimConfig,
             text_anchors: np.ndarray | None, say: Callable[[str], None] = lambda _: None) -> SimResult:
    """Runs one federation of ``config.rounds`` rounds with the named method; deterministic given ``seed``."""
    method = METHODS[method_name]
    if not method.small_language_model:
        config = replace(config, model=TINY_BACKBONE, cloud_model=None)
    poisoning = config.poisoning
    defence = DEFENCES[poisoning.defence]
    if poisoning.defence != "none" and (method.exact_lora or not method.federated):
        raise ValueError(f"defence {poisoning.defence!r} needs a federated method without exact LoRA, "
                         f"not {method_name!r}")
    started = time.perf_counter()
    recipe = replace(config.recipe, upload_stage=method.upload_stage,
                     ccl_weight=config.recipe.ccl_weight if method.ccl else 0.0,
                     seccl_weight=config.recipe.seccl_weight if method.seccl else 0.0,
                     fused_upload_samples=config.recipe.fused_upload_samples if method.seccl else 0)
    cloud_recipe = replace(config.cloud, ccl_weight=config.cloud.ccl_weight if method.ccl else 0.0)
    clients = client_data(data, config, p, seed, method.zero_fill)
    attackers = choose_attackers(len(clients), poisoning, seed)
    test, unseen = eval_sets(data, config)
    models: dict[frozenset[str], EdgeModel] = {}

    def model_for(modalities: frozenset[str]) -> EdgeModel:
        if modalities not in models:
            models[modalities] = build_edge_model(config.model, modalities, seed)
        return models[modalities]

    every = frozenset(Modality)
    global_model = model_for(every)
    # The cloud runs its own (possibly larger) model; with the devices' config it is the same object.
    edge_config, cloud = None, global_model
    if config.cloud_model is not None and config.cloud_model != config.model:
        edge_config, cloud = config.model, build_edge_model(config.cloud_model, every, seed)
    global_tensors = {k: v.numpy() for k, v in global_model.shared_state().items()}
    public_ids = np.concatenate([c.public.sample_ids for c in clients])
    public = data.train.subset(np.nonzero(np.isin(data.train.sample_ids, public_ids))[0])
    anchors: Anchors | None = None
    if method.seccl and text_anchors is not None:
        anchors = Anchors(np.zeros(0, dtype=np.int64), np.zeros((0, config.model.fused_dim), np.float32), text_anchors)
    local_states = [dict(global_tensors) for _ in clients]
    personal: list[dict[str, np.ndarray] | None] = [None] * len(clients)
    history: list[dict[str, float]] = []
    client_acc, upload_bytes, cloud_acc = float("nan"), 0.0, None
    for round_number in range(1, config.rounds + 1):
        round_seed = seed * 1_000_003 + round_number * 101
        updates, uploads, accs, sizes = [], [], [], []
        clock = time.perf_counter()
        for index, client in enumerate(clients):
            start = local_states[index] if not method.federated else global_tensors
            result = run_amt_round(model_for(client.modalities), client, start, recipe=recipe,
                                   seed=round_seed + index, anchors=anchors, personal=personal[index])
            accs.append(result.metrics.get("personal_accuracy", float("nan")))
            if not method.federated:
                # Local-only: the device keeps training its own model; nothing is aggregated.
                local_states[index] = {k: v.numpy() for k, v in model_for(client.modalities).shared_state().items()}
                continue
            personal[index] = result.personal
            attacking = index in attackers
            delta = poison_delta(result.delta, poisoning.attack) if attacking else result.delta
            sizes.append(_update_bytes(delta, result.fused))
            samples = claimed_samples(result.update_samples, poisoning.attack) if attacking else result.update_samples
            updates.append(ClientUpdate(client_id=str(index), tensors=delta, num_samples=samples,
                                        modalities=frozenset(str(m) for m in client.modalities)))
            uploads.append((result.fused_ids, result.fused))
        if method.federated and poisoning.attack in ADAPTIVE_ATTACKS and attackers:
            crafted = alie_delta(updates, len(attackers))
            updates = [replace(u, tensors={n: crafted[n] for n in u.tensors}) if int(u.client_id) in attackers else u
                       for u in updates]
        if method.federated:
            # What the coordinator does with the claimed counts before any weight is taken.
            capped = capped_sample_counts([u.num_samples for u in updates], poisoning.weight_ratio)
            updates = [replace(u, num_samples=n) for u, n in zip(updates, capped, strict=True)]
        client_acc = float(np.nanmean(accs))
        record: dict[str, float] = {"round": float(round_number), "client_accuracy_mean": client_acc,
                                    "devices_s": time.perf_counter() - clock}
        if method.federated:
            weights = _weights(method, updates, uploads, anchors, config.agreement_temperature)
            aggregated = aggregate_round(updates, weights, defence)
            delta = aggregated.delta
            new_tensors = {k: (v + delta[k]).astype(np.float32) if k in delta else v
                           for k, v in global_tensors.items()}
            if method.exact_lora:
                full = [replace(u, tensors={n: global_tensors[n] + t for n, t in u.tensors.items()}) for u in updates]
                new_tensors.update(average_lora_products(full, weights))
            global_tensors = new_tensors
            upload_bytes = float(np.mean(sizes))
            if poisoning.active:
                record.update(round_record(aggregated, attackers))
            # As the coordinator does: an excluded update's fused features stay out of cloud tuning.
            kept = [upload for update, upload in zip(updates, uploads, strict=True)
                    if update.client_id not in aggregated.excluded]
            if method.seccl:
                clock = time.perf_counter()
                tune_cloud(cloud, global_tensors, public, recipe=cloud_recipe, seed=round_seed,
                           edge_fused=mean_edge_fused(kept), text_anchors=text_anchors, edge_config=edge_config)
                anchors = generate_anchors(cloud, public, text_anchors)
                record["cloud_s"] = time.perf_counter() - clock
                cloud_acc = evaluate(cloud, test, every)
                record["cloud_accuracy"] = cloud_acc
            clock = time.perf_counter()
            global_model.load_shared_state(_as_torch(global_tensors))
            record["global_accuracy"] = evaluate(global_model, test, every)
            record["evaluation_s"] = time.perf_counter() - clock
        else:
            record["global_accuracy"] = _local_global_accuracy(clients, local_states, model_for, test)
        record["seconds"] = time.perf_counter() - started
        say(f"  round {round_number}: global {record['global_accuracy']:.3f}  client {client_acc:.3f}"
            + (f"  cloud {cloud_acc:.3f}" if "cloud_accuracy" in record else ""))
        history.append(record)
        if config.stop_when_flat and has_flattened([r["global_accuracy"] for r in history]):
            break
    unseen_acc = None
    if unseen is not None:
        if method.federated:
            global_model.load_shared_state(_as_torch(global_tensors))
            unseen_acc = evaluate(global_model, unseen, every)
        else:
            unseen_acc = _local_global_accuracy(clients, local_states, model_for, unseen)
    window = config.final_window
    client_mean = _tail_mean(history, "client_accuracy_mean", window)
    return SimResult(global_accuracy=_tail_mean(history, "global_accuracy", window) or 0.0,
                     client_accuracy_mean=float("nan") if client_mean is None else client_mean,
                     upload_bytes_per_client=upload_bytes, unseen_speaker_accuracy=unseen_acc,
                     cloud_accuracy=_tail_mean(history, "cloud_accuracy", window) if cloud_acc is not None else None,
                     history=history, seconds=time.perf_counter() - started, attackers=tuple(sorted(attackers)))


def _as_torch(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(v) for k, v in tensors.items()}


def _weights(method: Method, updates: list[ClientUpdate], uploads: list[tuple[np.ndarray, np.ndarray]],
             anchors: Anchors | None, temperature: float | None) -> list[float]:
    if method.aggregation == "fedavg":
        return fedavg_weights(updates)
    quality = None
    if method.seccl and temperature is not None and anchors is not None and len(anchors.sample_ids):
        agreements: list[float | None] = []
        for ids, fused in uploads:
            positions, found = anchors.lookup(ids)
            agreements.append(anchor_agreement(fused[positions], found) if len(positions) else None)
        quality = agreement_weights(agreements, temperature, groups=[u.modalities for u in updates])
    return mma_weights(updates, quality=quality)


def _local_global_accuracy(clients: list[AmtData], states: list[dict[str, np.ndarray]],
                           model_for: Callable[[frozenset[str]], EdgeModel], test: AVMnistSplit) -> float:
    """Local-only has no global model: the mean test accuracy of the clients' own models, own modalities."""
    scores = []
    for client, state in zip(clients, states, strict=True):
        model = model_for(client.modalities)
        model.load_shared_state(_as_torch(state))
        scores.append(evaluate(model, test, client.modalities))
    return float(np.mean(scores))
