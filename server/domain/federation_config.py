"""How a federation learns: ``FederationConfig``, its fields in named sections, and the bounds every number
keeps. Fixed when the federation is created; the admin API's schema is derived from it
(``server.transport.config_schema``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Literal

MAX_FUSED_UPLOAD_SAMPLES = 256
MIN_AGREEMENT_TEMPERATURE = 0.01
"""Sharper noise terms would let exp(agreement / τ) overflow in the streamed aggregation (and at 0.01 a
client 0.05 of cosine below its best peer already weighs e^-5)."""


@dataclass(frozen=True)
class Bounds:
    """The values a number of the federation config may take: [low, high], either end open."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def describe(self) -> str:
        def show(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"
        return f"{'(' if self.low_open else '['}{show(self.low)}, {show(self.high)}{')' if self.high_open else ']'}"


_MANY = 100_000
"""Devices, updates and buffers per round: far above one coordinator's fleet, well inside every type."""
_EPOCHS = Bounds(0, 1000)

CONFIG_BOUNDS: dict[str, Bounds] = {
    # Each bound keeps the value inside what every later use takes: the wire's int32 and uint64 fields, a
    # datetime a deadline is added to, a seed numpy accepts. A config the API accepted never fails later.
    "clients_per_round": Bounds(0, _MANY),
    "min_updates": Bounds(1, _MANY),
    "round_deadline_s": Bounds(0, 30 * 24 * 3600, low_open=True),
    "public_epochs": _EPOCHS,
    "private_epochs": _EPOCHS,
    "personal_epochs": _EPOCHS,
    "batch_size": Bounds(1, 65_536),
    "learning_rate": Bounds(0, 1, low_open=True, high_open=True),
    "max_chunk_bytes": Bounds(1024, 4 * 1024 * 1024),
    "seed": Bounds(0, 2**32 - 1),
    "ccl_weight": Bounds(0, 1000),
    "ccl_temperature": Bounds(0, 100, low_open=True),
    "seccl_weight": Bounds(0, 1000),
    "seccl_temperature": Bounds(0, 100, low_open=True),
    "fused_upload_samples": Bounds(0, MAX_FUSED_UPLOAD_SAMPLES),
    "agreement_temperature": Bounds(MIN_AGREEMENT_TEMPERATURE, 100),
    "cloud_epochs": _EPOCHS,
    "public_fraction": Bounds(0, 1, low_open=True, high_open=True),
    "public_shard_samples": Bounds(0, _MANY),
    "overselect": Bounds(0, 10),
    "async_buffer": Bounds(1, _MANY),
    "max_staleness": Bounds(0, 1000),
    "staleness_exponent": Bounds(0, 10),
    "target_rounds": Bounds(0, 1_000_000),
    "clip_norm": Bounds(0, 1e9),
    "max_update_norm": Bounds(0, 1e9),
    "trim_fraction": Bounds(0, 0.5, high_open=True),
    "exclude_above": Bounds(0, 1e6),
    "max_weight_ratio": Bounds(0, 1e6),
}
"""Every number of ``FederationConfig`` and its bounds, checked at creation (the admin API's schema reads
the same table, so a 422 names the field)."""


CONFIG_SECTIONS: dict[str, tuple[str, ...]] = {
    "scheduling": ("mode", "clients_per_round", "min_updates", "round_deadline_s", "overselect", "async_buffer",
                   "max_staleness", "staleness_exponent", "eligible_modality_sets", "target_rounds", "anchors"),
    "training": ("task", "model", "cloud_model", "upload_stage", "public_epochs", "private_epochs",
                 "personal_epochs", "batch_size", "learning_rate", "upload_codec", "max_chunk_bytes", "seed",
                 "ccl_weight", "ccl_temperature", "seccl_weight", "seccl_temperature", "fused_upload_samples",
                 "public_fraction", "public_shard_samples", "cloud_epochs", "server_learning"),
    "aggregation": ("aggregation", "lora_mode", "agreement_temperature"),
    "security": ("max_weight_ratio", "clip_norm", "max_update_norm", "robust_rule", "trim_fraction",
                 "exclude_above", "exclude_cosine_below"),
}
"""``FederationConfig``'s fields by what they govern: when rounds run and who takes part (scheduling), what
devices and the cloud train (training: most of it is sent to devices with every task), how updates are
combined (aggregation), and the bounds on what a hostile device can do to the result (security). The admin
API's schema tags every field with its section (``x-section``); ``docs/api.md`` lists them."""


@dataclass(frozen=True)
class FederationConfig:
    """How a federation learns. Sent to devices (training part) and used by the scheduler."""

    aggregation: Literal["mma", "fedavg"] = "mma"
    """Aggregation rule: ``mma`` (modality-count x sample-count weights) or ``fedavg`` (sample counts)."""
    lora_mode: Literal["separate", "exact"] = "separate"
    """LoRA factors: averaged separately (the paper's rule) or ``exact`` (average of B·A, re-factorised)."""
    clients_per_round: int = 0
    """Devices invited per round; 0 invites every live eligible device."""
    min_updates: int = 1
    """Quorum: the fewest accepted updates a round may commit with."""
    round_deadline_s: float = 600.0
    """After this many seconds an open round commits if quorum was reached, else fails."""
    upload_stage: Literal["private", "public"] = "private"
    """Which data a device's uploaded change is learned on: ``private`` (its private data + public shard,
    the method) or ``public`` (its public shard only: the prototype's rule, kept to compare against)."""
    public_epochs: int = 5
    """Epochs over the public shard; used only with ``upload_stage = "public"``."""
    private_epochs: int = 1
    """``private``: epochs of the uploaded stage over private data + public shard; ``public``: epochs
    of personalisation on private data."""
    personal_epochs: int = 1
    """``private`` upload stage: epochs of personal fine-tuning on private data after the uploaded stage."""
    batch_size: int = 32
    """Samples per optimiser step on devices and in cloud tuning."""
    learning_rate: float = 1e-3
    """AdamW learning rate on devices and in cloud tuning."""
    upload_codec: Literal["fp32", "fp16", "int8"] = "fp16"
    """How devices encode their updates (zstd-compressed); a device may use a more precise codec, never less."""
    max_chunk_bytes: int = 256 * 1024
    """Bytes per upload chunk devices send (each is acknowledged durably, so a resume loses at most one)."""
    seed: int = 0
    """Seeds the initial model, the devices' training and the public shards (with each device's id)."""
    model: dict[str, Any] = field(default_factory=dict)
    """Model configuration (``mlecs.model.ModelConfig.to_dict()``); empty means the defaults."""
    cloud_model: dict[str, Any] | None = None
    """The cloud's own model for tuning and anchors when it differs from the devices' (devices
    ``{"backbone_layers": 2}`` and the cloud ``{}``: the first two MiniLM layers on devices, all six on
    the cloud). It must keep the devices' ``fused_dim``: anchors live in the fused space. The cloud
    adopts the global tensors the two models share and keeps its own head. None: the devices' model."""
    ccl_weight: float = 0.1
    """Weight of CCL, the cross-modal volume loss, in both local stages (0 turns it off)."""
    ccl_temperature: float = 0.1
    """Temperature of CCL's softmax over volumes."""
    seccl_weight: float = 0.5
    """Weight of the SE-CCL anchor terms on devices and in cloud tuning (0 turns SE-CCL off)."""
    seccl_temperature: float = 0.1
    """Temperature of the SE-CCL anchor terms."""
    fused_upload_samples: int = 32
    """Public samples whose fused z each device uploads for edge -> cloud alignment and MMA's noise term."""
    agreement_temperature: float = 0.2
    """MMA noise term: weight factor exp((agreement - best) / this); larger is gentler."""
    cloud_epochs: int = 1
    """Epochs of cloud tuning on the public set per round (0: no tuning; anchors still generated)."""
    public_fraction: float = 0.2
    """The public set D': this share of the AV-MNIST training pairs, drawn with ``seed``; the devices'
    partitions must use the same fraction and seed, so that the cloud's anchors cover their public shards."""
    public_shard_samples: int = 128
    """With a task: how many samples of the coordinator's public set each device downloads as its public
    shard (drawn by ``seed`` and the device's id; 0: the whole set). Devices holding their own copy keep it."""
    mode: Literal["sync", "async"] = "sync"
    """``sync``: rounds with over-selection, quorum and deadline. ``async``: buffered asynchronous
    aggregation (FedBuff): every ``async_buffer`` accepted updates, staleness-weighted, make a version."""
    overselect: float = 0.0
    """Sync mode: invite ceil(clients_per_round x (1 + overselect)) devices and commit once
    clients_per_round updates arrived; the stragglers' late uploads are refused."""
    async_buffer: int = 4
    """Async mode: accepted updates per aggregation (K)."""
    max_staleness: int = 4
    """Async mode: an update trained from a version more than this many versions old is refused."""
    staleness_exponent: float = 0.5
    """Async mode: an update s versions stale weighs (1 + s) ** -staleness_exponent."""
    eligible_modality_sets: list[list[str]] = field(default_factory=list)
    """Only devices whose modality set is one of these take part (e.g. [["audio", "image"]]); empty: all."""
    target_rounds: int = 0
    """The scheduler opens rounds by itself until this many are committed (a failed round is followed by
    the next); 0: rounds start only when launched through the admin API."""
    anchors: Literal["latest", "wait"] = "latest"
    """With ``server_learning``: ``latest`` opens the next round as soon as a round commits, with the newest
    anchors the cloud worker has generated (one round behind while it works); ``wait`` opens it only once the
    worker has tuned the cloud on the new version and generated its anchors (the paper's order, and the round
    rate then includes the cloud's work)."""
    server_learning: bool = True
    """After each commit: evaluate the global model, tune the cloud model and generate anchors. Off for
    a pure aggregation service (or a coordinator without the data set)."""
    clip_norm: float = 0.0
    """Each update's delta (all its tensors together) is scaled down to at most this L2 norm before it is
    aggregated, with any rule; 0: no clipping."""
    max_update_norm: float = 0.0
    """An update whose delta (all its adapter tensors together, not the fused features) has a larger L2 norm
    is rejected (reason ``norm_bound``) before it reaches aggregation; 0: no bound. Unlike ``clip_norm``,
    which scales every update down, this refuses the update outright."""
    max_weight_ratio: float = 2.0
    """No update's sample count (the device's own claim) counts for more than this many times the round's
    lower median count: a device cannot buy the global model by claiming 2^31 samples. 2 keeps 20% of
    inflating devices under a third of the weight (a weighted robust rule needs them under half; 4 would
    give them half), while honest AV-MNIST partitions stay under 1.5 times the median. 0: counts as claimed
    (trusted devices only)."""
    task: str | None = None
    """The federation's task: a built-in name (avmnist, avmnist-hard) or a task file's TOML text
    (docs/datasets.md), stored as the task's text, frozen at creation: the modalities the model reads, their
    input specs and the label names. None: the bundled AV-MNIST with ``model``'s defaults."""
    robust_rule: Literal["none", "median", "trimmed_mean"] = "none"
    """``median`` or ``trimmed_mean``: per coordinate over the round's updates, weighted by the rule's
    (MMA or FedAvg) weights, instead of the weighted mean. The coordinator spills the round's updates to
    disk and reduces them in coordinate blocks, so memory stays flat in the number of updates."""
    trim_fraction: float = 0.1
    """``trimmed_mean``: the share of the weight cut from each end of every coordinate, in [0, 0.5)."""
    exclude_above: float = 0.0
    """With a robust rule: leave out updates whose distance to the coordinate-wise median is more than this
    many times the median distance (their anomaly score); 0: keep every update."""
    exclude_cosine_below: float | None = None
    """With a robust rule: leave out updates whose cosine with the coordinate-wise median (per tensor,
    averaged over the update's tensors by size) is below this, in [-1, 1). 0 leaves out updates pointing
    away from the median, as a sign-flipped one does: its norm is honest and its distance only modestly
    larger, but its direction is reversed. None: no direction check."""

    def __post_init__(self) -> None:
        problems = _bounds_problems(self)
        if self.aggregation not in ("mma", "fedavg"):
            problems.append(f"aggregation must be 'mma' or 'fedavg', not {self.aggregation!r}")
        if self.lora_mode not in ("separate", "exact"):
            problems.append(f"lora_mode must be 'separate' or 'exact', not {self.lora_mode!r}")
        if self.mode == "sync" and self.clients_per_round and self.min_updates > self.clients_per_round:
            problems.append(f"min_updates ({self.min_updates}) must be at most clients_per_round "
                            f"({self.clients_per_round}): a round could never reach its quorum")
        if self.upload_stage not in ("private", "public"):
            problems.append(f"upload_stage must be 'private' or 'public', not {self.upload_stage!r}")
        if self.upload_stage == "private" and self.private_epochs < 1:
            problems.append("private_epochs must be >= 1 with upload_stage 'private': that stage makes the update")
        if self.upload_codec not in ("fp32", "fp16", "int8"):
            problems.append(f"upload_codec must be fp32, fp16 or int8, not {self.upload_codec!r}")
        if self.mode not in ("sync", "async"):
            problems.append(f"mode must be 'sync' or 'async', not {self.mode!r}")
        if self.cloud_model is not None and not isinstance(self.cloud_model, dict):
            problems.append("cloud_model must be an object of model settings, or null for the devices' model")
        problems.extend(_modality_set_problems(self.eligible_modality_sets, self.modality_names()))
        problems.extend(self._robust_problems())
        if problems:
            raise ValueError("; ".join(problems))

    def _robust_problems(self) -> list[str]:
        problems = []
        if self.robust_rule not in ("none", "median", "trimmed_mean"):
            problems.append(f"robust_rule must be 'none', 'median' or 'trimmed_mean', not {self.robust_rule!r}")
        if 0 < self.exclude_above < 1:
            problems.append("exclude_above must be 0 (off) or at least 1 (times the median distance)")
        if self.exclude_above and self.robust_rule == "none":
            problems.append("exclude_above needs a robust_rule ('median' or 'trimmed_mean'): the anomaly score "
                            "is the distance to their coordinate-wise median")
        cosine = self.exclude_cosine_below
        if cosine is not None and (isinstance(cosine, bool) or not isinstance(cosine, int | float)
                                   or not -1 <= cosine < 1):  # also false for nan
            problems.append(f"exclude_cosine_below must be null (off) or a cosine in [-1, 1), not {cosine!r}")
        elif cosine is not None and self.robust_rule == "none":
            problems.append("exclude_cosine_below needs a robust_rule ('median' or 'trimmed_mean'): the cosine is "
                            "taken with their coordinate-wise median")
        if self.robust_rule != "none" and self.lora_mode == "exact":
            problems.append("robust_rule works coordinate by coordinate on the deltas; lora_mode 'exact' averages "
                            "products of LoRA factors: use lora_mode 'separate' with a robust rule")
        return problems

    def task_spec(self) -> Any:
        """The parsed :class:`mlecs.tasks.TaskSpec` of ``task`` (None without one); raises TaskError."""
        return None if self.task is None else _parsed_task(self.task)

    def modality_names(self) -> tuple[str, ...] | None:
        """The modalities of this federation's model (its task's), or None while ``model`` is invalid."""
        from mlecs.model.config import ModelConfig

        try:
            return ModelConfig.from_dict(dict(self.model)).modality_names
        except (TypeError, ValueError):
            return None

    def eligible(self, modalities: frozenset[str]) -> bool:
        """Whether a device with these modalities may take part in this federation's rounds."""
        return not self.eligible_modality_sets or any(
            frozenset(m.strip().lower() for m in allowed) == modalities for allowed in self.eligible_modality_sets)


@lru_cache(maxsize=32)
def _parsed_task(text: str) -> Any:
    from mlecs.tasks import parse_task

    return parse_task(text, "task")


_FIELD_DEFAULTS: dict[str, Any] = {}  # filled below, once the class exists


def _bounds_problems(config: FederationConfig) -> list[str]:
    """A problem for each number out of its ``CONFIG_BOUNDS`` (or of the wrong type), naming the field."""
    problems = []
    for name, bounds in CONFIG_BOUNDS.items():
        value = getattr(config, name)
        wants_int = isinstance(_FIELD_DEFAULTS[name], int)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (wants_int and not isinstance(value, int)):
            problems.append(f"{name} must be {'an integer' if wants_int else 'a number'}, not {value!r}")
        elif not bounds.holds(value):
            problems.append(f"{name} must be in {bounds.describe()}, not {value!r}")
    return problems


_FIELD_DEFAULTS.update({f.name: f.default for f in fields(FederationConfig)})


def _modality_set_problems(sets: list[list[str]], known: tuple[str, ...] | None) -> list[str]:
    from mlecs.modality import parse_modalities

    problems = []
    for allowed in sets:
        try:
            if not allowed or len(parse_modalities(list(allowed), known)) != len(allowed):
                raise ValueError("empty or repeated")
        except ValueError as exc:
            problems.append(f"eligible_modality_sets: {allowed!r} is not a set of modality names ({exc})")
    return problems
