"""Public/private partitioning and modality assignment: disjoint, complete and reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from mlecs.data.avmnist import AVMnistSplit, load_avmnist_tiny
from mlecs.data.partition import (
    AUDIO_ONLY,
    BOTH,
    IMAGE_ONLY,
    PartitionSpec,
    assign_modality_sets,
    client_shard,
    partition_by_speaker,
    partition_dirichlet,
    partition_speaker_dirichlet,
    plan_shards,
    split_public,
)


@pytest.fixture(scope="module")
def train() -> AVMnistSplit:
    return load_avmnist_tiny().train


def _assert_exact_cover(parts: list[np.ndarray], expected: np.ndarray) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "parts overlap"
    np.testing.assert_array_equal(np.sort(joined), np.sort(expected))


def test_split_public_takes_the_requested_share_disjointly() -> None:
    public, private = split_public(1000, 0.2, seed=3)

    assert len(public) == 200 and len(private) == 800
    _assert_exact_cover([public, private], np.arange(1000))


def test_split_public_is_reproducible_and_depends_on_the_seed() -> None:
    assert np.array_equal(split_public(500, 0.3, 1)[0], split_public(500, 0.3, 1)[0])
    assert not np.array_equal(split_public(500, 0.3, 1)[0], split_public(500, 0.3, 2)[0])


def test_dirichlet_partition_covers_the_index_disjointly_with_a_minimum_size() -> None:
    labels = np.repeat(np.arange(10), 50)
    index = np.arange(0, 500, 2)

    parts = partition_dirichlet(labels, index, num_clients=4, alpha=0.5, seed=0, min_size=10)

    _assert_exact_cover(parts, index)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_partition_is_reproducible_from_seed() -> None:
    labels = np.repeat(np.arange(10), 30)
    index = np.arange(300)

    first = partition_dirichlet(labels, index, 3, 0.5, seed=7)
    second = partition_dirichlet(labels, index, 3, 0.5, seed=7)
    other = partition_dirichlet(labels, index, 3, 0.5, seed=8)

    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = np.repeat(np.arange(10), 100)
    index = np.arange(1000)

    def mean_label_entropy(alpha: float) -> float:
        entropies = []
        for part in partition_dirichlet(labels, index, 5, alpha, seed=0):
            p = np.bincount(labels[part], minlength=10) / len(part)
            entropies.append(-(p[p > 0] * np.log(p[p > 0])).sum())
        return float(np.mean(entropies))

    assert mean_label_entropy(0.1) < mean_label_entropy(100.0)


def test_dirichlet_partition_rejects_too_little_data_for_the_minimum_size() -> None:
    with pytest.raises(ValueError, match="min_size"):
        partition_dirichlet(np.zeros(20, dtype=np.int64), np.arange(20), num_clients=3, alpha=0.5, seed=0)


@pytest.mark.parametrize("num_clients", [2, 3, 6])
def test_speaker_partition_keeps_each_speaker_on_one_client(num_clients: int) -> None:
    speakers = np.repeat(np.arange(6), 20)
    index = np.arange(120)

    parts = partition_by_speaker(speakers, index, num_clients, seed=1)

    _assert_exact_cover(parts, index)
    owners = [set(speakers[p].tolist()) for p in parts]
    assert sum(len(o) for o in owners) == 6
    assert all(owners)


def test_speaker_partition_with_more_clients_than_speakers_splits_speakers_evenly() -> None:
    speakers = np.repeat(np.arange(6), 20)
    index = np.arange(120)

    parts = partition_by_speaker(speakers, index, num_clients=12, seed=0)

    _assert_exact_cover(parts, index)
    assert all(len(set(speakers[p].tolist())) == 1 for p in parts)
    assert sorted(len(p) for p in parts) == [10] * 12


def test_three_clients_get_one_each_of_both_image_only_and_audio_only() -> None:
    for seed in range(5):
        sets = assign_modality_sets(3, seed)

        assert sets[0] == BOTH
        assert sorted(sets, key=sorted) == sorted([BOTH, IMAGE_ONLY, AUDIO_ONLY], key=sorted)


def test_larger_fleets_cycle_the_modality_mix_reproducibly() -> None:
    sets = assign_modality_sets(9, seed=4)

    assert sets == assign_modality_sets(9, seed=4)
    assert sets[0] == BOTH
    assert [sets.count(s) for s in (BOTH, IMAGE_ONLY, AUDIO_ONLY)] == [3, 3, 3]


def test_missing_fraction_controls_how_many_clients_miss_a_modality() -> None:
    sets = assign_modality_sets(10, seed=0, missing_fraction=0.4)

    assert sets.count(IMAGE_ONLY) == 2 and sets.count(AUDIO_ONLY) == 2 and sets.count(BOTH) == 6
    assert sets[0] == BOTH
    assert assign_modality_sets(4, seed=0, missing_fraction=0.0) == [BOTH] * 4


def test_plan_shards_splits_public_evenly_and_covers_the_training_split(train: AVMnistSplit) -> None:
    spec = PartitionSpec(num_clients=3, public_fraction=0.25, seed=0)

    shards = plan_shards(train, spec)

    publics = [s.public_index for s in shards]
    privates = [s.private_index for s in shards]
    _assert_exact_cover(publics + privates, np.arange(len(train)))
    assert sum(len(p) for p in publics) == round(0.25 * len(train))
    assert max(len(p) for p in publics) - min(len(p) for p in publics) <= 1
    assert [s.client_index for s in shards] == [0, 1, 2]


def test_client_shard_recomputes_the_planned_shard(train: AVMnistSplit) -> None:
    spec = PartitionSpec(num_clients=4, scheme="speaker", seed=5)
    planned = plan_shards(train, spec)

    for index in range(4):
        shard = client_shard(train, spec, index)
        assert shard.modalities == planned[index].modalities
        np.testing.assert_array_equal(shard.public_index, planned[index].public_index)
        np.testing.assert_array_equal(shard.private_index, planned[index].private_index)


def test_speaker_scheme_keeps_each_speaker_private_data_on_one_client(train: AVMnistSplit) -> None:
    shards = plan_shards(train, PartitionSpec(num_clients=3, scheme="speaker", seed=0))

    owners = [set(train.speaker[s.private_index].tolist()) for s in shards]
    assert sum(len(o) for o in owners) == len(np.unique(train.speaker))


def test_missing_fraction_in_the_spec_reaches_every_client(train: AVMnistSplit) -> None:
    spec = PartitionSpec(num_clients=4, seed=0, missing_fraction=0.5)

    assert [s.modalities for s in plan_shards(train, spec)] == assign_modality_sets(4, 0, 0.5)
    assert client_shard(train, spec, 3).modalities == assign_modality_sets(4, 0, 0.5)[3]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 3, "scheme": "random"}, "scheme"),
        ({"num_clients": 3, "alpha": 0.0}, "alpha"),
        ({"num_clients": 3, "public_fraction": 1.0}, "public_fraction"),
        ({"num_clients": 3, "seed": -1}, "seed"),
        ({"num_clients": 3, "missing_fraction": 1.5}, "missing_fraction"),
    ],
)
def test_invalid_partition_spec_names_the_bad_argument(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PartitionSpec(**kwargs)  # type: ignore[arg-type]


def test_client_index_out_of_range_is_rejected(train: AVMnistSplit) -> None:
    with pytest.raises(ValueError, match="client_index"):
        client_shard(train, PartitionSpec(num_clients=2), 2)


# --- speaker-dirichlet -------------------------------------------------------------------------------------


def _speakers_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """3 speakers x 60 samples, 6 of each digit per speaker."""
    return np.repeat(np.arange(3), 60), np.tile(np.arange(10), 18)


@pytest.mark.parametrize("num_clients", [4, 7, 9])
def test_speaker_dirichlet_gives_every_client_one_speaker_and_covers_the_index(num_clients: int) -> None:
    speakers, labels = _speakers_and_labels()
    index = np.arange(180)

    parts = partition_speaker_dirichlet(speakers, labels, index, num_clients, alpha=0.5, seed=0)

    assert len(parts) == num_clients
    _assert_exact_cover(parts, index)
    assert all(len(p) >= 10 for p in parts)
    owners = [set(speakers[p].tolist()) for p in parts]
    assert all(len(o) == 1 for o in owners)
    clients_per_speaker = sorted(np.bincount([o.pop() for o in owners], minlength=3).tolist())
    expected = [num_clients // 3 + (1 if s < num_clients % 3 else 0) for s in range(3)]
    assert clients_per_speaker == sorted(expected)


def test_speaker_dirichlet_covers_a_subset_index_with_positions_into_the_full_arrays() -> None:
    speakers, labels = _speakers_and_labels()
    index = np.arange(1, 180, 2)  # odd positions only: 30 per speaker

    parts = partition_speaker_dirichlet(speakers, labels, index, num_clients=5, alpha=1.0, seed=2, min_size=5)

    _assert_exact_cover(parts, index)
    assert all(len(set(speakers[p].tolist())) == 1 for p in parts)


def test_speaker_dirichlet_is_reproducible_from_seed() -> None:
    speakers, labels = _speakers_and_labels()
    index = np.arange(180)

    first = partition_speaker_dirichlet(speakers, labels, index, 7, 0.5, seed=4)
    second = partition_speaker_dirichlet(speakers, labels, index, 7, 0.5, seed=4)
    other = partition_speaker_dirichlet(speakers, labels, index, 7, 0.5, seed=5)

    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("num_clients", [1, 2, 3])
def test_speaker_dirichlet_equals_the_speaker_partition_with_at_most_one_client_per_speaker(num_clients: int) -> None:
    speakers, labels = _speakers_and_labels()
    index = np.arange(0, 180, 3)

    parts = partition_speaker_dirichlet(speakers, labels, index, num_clients, alpha=0.1, seed=3)
    expected = partition_by_speaker(speakers, index, num_clients, seed=3)

    assert len(parts) == len(expected) == num_clients
    assert all(np.array_equal(a, b) for a, b in zip(parts, expected, strict=True))


def test_speaker_dirichlet_skews_labels_within_a_speaker_more_with_small_alpha() -> None:
    speakers, labels = np.repeat(np.arange(2), 500), np.tile(np.arange(10), 100)
    index = np.arange(1000)

    def mean_label_entropy(alpha: float) -> float:
        entropies = []
        for part in partition_speaker_dirichlet(speakers, labels, index, 8, alpha, seed=0):
            p = np.bincount(labels[part], minlength=10) / len(part)
            entropies.append(-(p[p > 0] * np.log(p[p > 0])).sum())
        return float(np.mean(entropies))

    assert mean_label_entropy(0.1) < mean_label_entropy(100.0) - 0.3
    assert mean_label_entropy(100.0) > 0.95 * np.log(10)


def test_speaker_dirichlet_refuses_a_speaker_too_small_for_its_clients() -> None:
    speakers, labels = _speakers_and_labels()

    with pytest.raises(ValueError, match="min_size"):
        partition_speaker_dirichlet(speakers, labels, np.arange(180), 9, 0.5, seed=0, min_size=25)


@pytest.mark.parametrize(("kwargs", "match"), [({"num_clients": 0}, "num_clients"), ({"alpha": 0.0}, "alpha")])
def test_speaker_dirichlet_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    speakers, labels = _speakers_and_labels()
    arguments: dict[str, object] = {"num_clients": 4, "alpha": 0.5, **kwargs}

    with pytest.raises(ValueError, match=match):
        partition_speaker_dirichlet(speakers, labels, np.arange(180), seed=0, **arguments)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        partition_speaker_dirichlet(speakers, labels, np.zeros(0, np.int64), 4, 0.5, seed=0)


def test_plan_shards_accepts_the_speaker_dirichlet_scheme(train: AVMnistSplit) -> None:
    spec = PartitionSpec(num_clients=8, scheme="speaker-dirichlet", seed=0)

    shards = plan_shards(train, spec)

    assert spec.scheme == "speaker-dirichlet"
    _assert_exact_cover([s.public_index for s in shards] + [s.private_index for s in shards], np.arange(len(train)))
    assert all(len(set(train.speaker[s.private_index].tolist())) == 1 for s in shards)
    assert all(len(s.private_index) >= 10 for s in shards)
    assert [s.modalities for s in shards] == assign_modality_sets(8, 0)


def test_speaker_dirichlet_shards_match_the_speaker_scheme_with_few_clients(train: AVMnistSplit) -> None:
    mixed = plan_shards(train, PartitionSpec(num_clients=3, scheme="speaker-dirichlet", seed=1))
    speaker = plan_shards(train, PartitionSpec(num_clients=3, scheme="speaker", seed=1))

    for a, b in zip(mixed, speaker, strict=True):
        np.testing.assert_array_equal(a.private_index, b.private_index)
        np.testing.assert_array_equal(a.public_index, b.public_index)


def test_the_audio_missing_scheme_takes_audio_from_the_same_clients_the_alternate_one_picks() -> None:
    alternate = assign_modality_sets(10, seed=3, missing_fraction=0.4)
    audio = assign_modality_sets(10, seed=3, missing_fraction=0.4, missing_scheme="audio")

    missing = [i for i, mods in enumerate(alternate) if mods != BOTH]
    assert [i for i, mods in enumerate(audio) if mods != BOTH] == missing
    assert all(audio[i] == IMAGE_ONLY for i in missing)
    assert {alternate[i] for i in missing} == {IMAGE_ONLY, AUDIO_ONLY}
    # A larger p adds devices to a smaller one's: the grid's p values are nested.
    smaller = assign_modality_sets(10, seed=3, missing_fraction=0.2, missing_scheme="audio")
    assert {i for i, m in enumerate(smaller) if m != BOTH} < set(missing)


def test_an_unknown_missing_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="missing_scheme must be one of alternate, audio"):
        assign_modality_sets(4, seed=0, missing_fraction=0.5, missing_scheme="video")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing_scheme"):
        PartitionSpec(num_clients=4, missing_scheme="video")  # type: ignore[arg-type]
