"""Splits the AV-MNIST training split into a public set and per-client private shards, reproducibly.

Every function is a pure function of its arguments and seed, so the coordinator and each device can
recompute a client's shard from a :class:`PartitionSpec` alone, without shipping index lists around.
Indices are always positions in ``AVMnist.train``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from mlecs.data.avmnist import AVMnistSplit
from mlecs.modality import Modality

Scheme = Literal["speaker", "dirichlet", "speaker-dirichlet"]
SCHEMES: tuple[str, ...] = get_args(Scheme)

MissingScheme = Literal["alternate", "audio"]
MISSING_SCHEMES: tuple[str, ...] = get_args(MissingScheme)
"""Which modality the clients counted by a missing fraction lack: ``alternate`` (audio, then image, in
turn) or ``audio`` (every one of them lacks the audio stream)."""

BOTH = frozenset({Modality.IMAGE, Modality.AUDIO})
IMAGE_ONLY = frozenset({Modality.IMAGE})
AUDIO_ONLY = frozenset({Modality.AUDIO})

# Salts so that the public split, the private partition and the modality mix draw independent streams
# from the same user seed (changing one scheme never reshuffles the others).
_PUBLIC_SALT, _PUBLIC_SHARD_SALT, _SPEAKER_SALT, _DIRICHLET_SALT, _MODALITY_SALT = 11, 13, 23, 37, 41

_DIRICHLET_MAX_TRIES = 1000


@dataclass(frozen=True)
class PartitionSpec:
    """Everything needed to recompute one client's shard anywhere."""

    num_clients: int
    scheme: Scheme = "dirichlet"
    """``dirichlet``: label skew over the private data; ``speaker``: the natural per-speaker partition;
    ``speaker-dirichlet``: clients dealt to speakers, then each speaker's data label-skewed across its clients."""
    alpha: float = 0.5
    """Dirichlet concentration: smaller means more label skew (only used by ``dirichlet``)."""
    public_fraction: float = 0.2
    """Share of the training split that plays the public set D'."""
    seed: int = 0
    missing_fraction: float | None = None
    """``None``: the default modality mix; else the share of clients that miss one modality."""
    missing_scheme: MissingScheme = "alternate"
    """Which modality those clients miss (see :data:`MISSING_SCHEMES`)."""

    def __post_init__(self) -> None:
        _check_num_clients(self.num_clients)
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        _check_alpha(self.alpha)
        _check_fraction("public_fraction", self.public_fraction, upper_inclusive=False)
        _check_seed(self.seed)
        if self.missing_fraction is not None:
            _check_fraction("missing_fraction", self.missing_fraction, upper_inclusive=True)
        _check_missing_scheme(self.missing_scheme)


@dataclass(frozen=True, eq=False)
class ClientShard:
    """One client's modalities and data: indices into ``AVMnist.train``."""

    client_index: int
    modalities: frozenset[Modality]
    public_index: np.ndarray
    """This client's disjoint share of the public set."""
    private_index: np.ndarray
    """Its private data (never leaves the device)."""


def _check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")


def _check_fraction(name: str, value: float, *, upper_inclusive: bool) -> None:
    upper_ok = value <= 1.0 if upper_inclusive else value < 1.0
    if not (isinstance(value, int | float) and value >= 0.0 and upper_ok):
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")


def _check_missing_scheme(scheme: str) -> None:
    if scheme not in MISSING_SCHEMES:
        raise ValueError(f"missing_scheme must be one of {', '.join(MISSING_SCHEMES)}, got {scheme!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _rng(seed: int, salt: int) -> np.random.Generator:
    _check_seed(seed)
    return np.random.default_rng([seed, salt])


def split_public(num_train: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``round(fraction * num_train)`` samples as the public set; returns (public, private), sorted."""
    if num_train < 0:
        raise ValueError(f"num_train must be non-negative, got {num_train!r}")
    _check_fraction("fraction", fraction, upper_inclusive=False)
    order = _rng(seed, _PUBLIC_SALT).permutation(num_train)
    num_public = round(fraction * num_train)
    return np.sort(order[:num_public]), np.sort(order[num_public:])


def partition_by_speaker(speakers: np.ndarray, index: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Splits ``index`` by speaker (``speakers[i]`` is the speaker of sample ``i``) into client shards.

    With at most as many clients as speakers, each speaker goes whole to one client (speakers shuffled
    by seed, dealt round-robin). With more clients, every client gets samples of a single speaker and
    a speaker's samples are split evenly across the clients dealt to it.
    """
    _check_num_clients(num_clients)
    index = np.asarray(index, dtype=np.int64)
    rng = _rng(seed, _SPEAKER_SALT)
    owners = np.asarray(speakers)[index]
    unique = rng.permutation(np.unique(owners))
    if unique.size == 0:
        raise ValueError("index is empty: nothing to partition by speaker")
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    if num_clients <= unique.size:
        for position, speaker in enumerate(unique):
            shards[position % num_clients].append(index[owners == speaker])
    else:
        clients_of = [list(range(s, num_clients, unique.size)) for s in range(unique.size)]
        for speaker, clients in zip(unique, clients_of, strict=True):
            samples = rng.permutation(index[owners == speaker])
            for client, part in zip(clients, np.array_split(samples, len(clients)), strict=True):
                shards[client].append(part)
    return [np.sort(np.concatenate(parts)) for parts in shards]


def partition_dirichlet(
    labels: np.ndarray, index: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Splits ``index`` into label-skewed client shards: per class, client shares ~ Dirichlet(alpha).

    Draws are repeated (from the same seeded stream) until every client holds at least ``min_size``
    samples; raises ValueError if that is impossible or keeps failing.
    """
    _check_num_clients(num_clients)
    _check_alpha(alpha)
    if min_size < 0:
        raise ValueError(f"min_size must be non-negative, got {min_size!r}")
    index = np.asarray(index, dtype=np.int64)
    if index.size < num_clients * min_size:
        raise ValueError(
            f"index has {index.size} samples, fewer than num_clients * min_size = {num_clients * min_size}"
        )
    rng = _rng(seed, _DIRICHLET_SALT)
    classes = np.asarray(labels)[index]
    for _ in range(_DIRICHLET_MAX_TRIES):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in np.unique(classes):
            samples = rng.permutation(index[classes == label])
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * samples.size).astype(np.int64)
            for client, part in enumerate(np.split(samples, cuts)):
                shards[client].append(part)
        result = [np.sort(np.concatenate(parts)) for parts in shards]
        if min(part.size for part in result) >= min_size:
            return result
    raise ValueError(
        f"could not give every client min_size={min_size} samples in {_DIRICHLET_MAX_TRIES} draws; "
        "raise alpha or lower min_size"
    )


def partition_speaker_dirichlet(
    speakers: np.ndarray, labels: np.ndarray, index: np.ndarray, num_clients: int, alpha: float, seed: int,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Speaker skew and label skew together: clients are dealt to speakers round-robin (speakers
    shuffled by seed), then each speaker's samples are split across its clients with Dirichlet(alpha)
    label shares. With fewer clients than speakers a client takes several speakers whole.
    """
    _check_num_clients(num_clients)
    _check_alpha(alpha)
    index = np.asarray(index, dtype=np.int64)
    owners = np.asarray(speakers)[index]
    unique = _rng(seed, _SPEAKER_SALT).permutation(np.unique(owners))
    if unique.size == 0:
        raise ValueError("index is empty: nothing to partition by speaker")
    if num_clients <= unique.size:
        return partition_by_speaker(speakers, index, num_clients, seed)
    shards: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for position, speaker in enumerate(unique):
        clients = list(range(position, num_clients, unique.size))
        parts = partition_dirichlet(labels, index[owners == speaker], len(clients), alpha, seed + position,
                                    min_size=min_size)
        for client, part in zip(clients, parts, strict=True):
            shards[client] = part
    return shards


def assign_modality_sets(
    num_clients: int, seed: int, missing_fraction: float | None = None, missing_scheme: MissingScheme = "alternate"
) -> list[frozenset[Modality]]:
    """Chooses each client's modality set, reproducibly from ``seed``.

    Default: client 0 holds both modalities and the others cycle both / image-only / audio-only in an
    order shuffled by seed (3 clients: exactly one of each). With ``missing_fraction`` p:
    ``round(p * num_clients)`` clients (Python rounding, half to even; client 0 last to be picked)
    miss one modality, and the rest hold both: with ``missing_scheme="alternate"`` the first picked
    misses audio, the next image, and so on; with ``"audio"`` every picked client misses audio. The
    clients picked are the same for both schemes and for every p: a larger p adds clients to a smaller one's.
    """
    _check_num_clients(num_clients)
    _check_missing_scheme(missing_scheme)
    rng = _rng(seed, _MODALITY_SALT)
    if missing_fraction is None:
        cycle = [BOTH, IMAGE_ONLY, AUDIO_ONLY]
        pattern = [cycle[i % len(cycle)] for i in range(num_clients)]
        rest = [pattern[1 + i] for i in rng.permutation(num_clients - 1)]
        return [pattern[0], *rest]
    _check_fraction("missing_fraction", missing_fraction, upper_inclusive=True)
    num_missing = round(missing_fraction * num_clients)
    pick_order = [*(1 + rng.permutation(num_clients - 1)).tolist(), 0]
    result = [BOTH] * num_clients
    for position, client in enumerate(pick_order[:num_missing]):
        result[client] = IMAGE_ONLY if position % 2 == 0 or missing_scheme == "audio" else AUDIO_ONLY
    return result


def plan_shards(train: AVMnistSplit, spec: PartitionSpec, missing_fraction: float | None = None) -> list[ClientShard]:
    """Computes every client's shard: an even disjoint share of the public set plus private data.

    ``missing_fraction`` overrides ``spec.missing_fraction`` when given.
    """
    fraction = spec.missing_fraction if missing_fraction is None else missing_fraction
    public, private = split_public(len(train), spec.public_fraction, spec.seed)
    # Shuffle before dealing: the training split is ordered by speaker and digit, so contiguous chunks
    # of the sorted public set would hand each client a few speakers' few digits.
    shuffled = _rng(spec.seed, _PUBLIC_SHARD_SALT).permutation(public)
    public_shards = [np.sort(part) for part in np.array_split(shuffled, spec.num_clients)]
    if spec.scheme == "speaker":
        private_shards = partition_by_speaker(train.speaker, private, spec.num_clients, spec.seed)
    elif spec.scheme == "speaker-dirichlet":
        private_shards = partition_speaker_dirichlet(
            train.speaker, train.labels, private, spec.num_clients, spec.alpha, spec.seed
        )
    else:
        private_shards = partition_dirichlet(train.labels, private, spec.num_clients, spec.alpha, spec.seed)
    modality_sets = assign_modality_sets(spec.num_clients, spec.seed, fraction, spec.missing_scheme)
    return [
        ClientShard(client_index=i, modalities=modality_sets[i], public_index=pub, private_index=priv)
        for i, (pub, priv) in enumerate(zip(public_shards, private_shards, strict=True))
    ]


def client_shard(
    train: AVMnistSplit, spec: PartitionSpec, client_index: int, missing_fraction: float | None = None
) -> ClientShard:
    """Computes one client's shard: ``plan_shards(train, spec, missing_fraction)[client_index]``."""
    if not 0 <= client_index < spec.num_clients:
        raise ValueError(f"client_index must be in [0, {spec.num_clients}), got {client_index!r}")
    return plan_shards(train, spec, missing_fraction)[client_index]
