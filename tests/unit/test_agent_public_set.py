"""The agent's public set: the coordinator's shard cached in the state directory (downloaded again only when it
changed or the cache is damaged), or the device's own copy with the samples the coordinator does not
recognise left out. The coordinator side runs for real in tests/integration/test_task_federation.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import ConfigError
from edge_agent.public_set import SHARD_DIR, checked_copy, downloaded_shard
from edge_agent.tasks import PublicCopyCheck, PublicShard
from edge_agent.trainer import LocalData
from mlecs.datasets import load_dataset
from mlecs.datasets.public_shard import SampleFingerprint, write_shard
from tests.unit.test_public_shard import TASK, _dataset


def _local(tmp_path: Path, public: Path | None = None) -> LocalData:
    directory = tmp_path / "private"
    private, _ = load_dataset(directory if directory.is_dir() else _dataset(directory, 4), TASK)
    held = private if public is None else load_dataset(public, TASK)[0]
    return LocalData(modalities=frozenset({"v", "w"}), public=held if public else private.subset(np.zeros(0, int)),
                     private_train=private, private_heldout=private, task=TASK)


class Coordinator:
    """Serves one shard as the coordinator does: the archive, or only its digest when the device has it."""

    def __init__(self, archive: bytes | None) -> None:
        self.archive = archive
        self.asked: list[str] = []

    def fetch(self, cached: str) -> PublicShard:
        self.asked.append(cached)
        if self.archive is None:
            return PublicShard(held=False)
        digest = hashlib.sha256(self.archive).hexdigest()
        return PublicShard(True, digest, 3, None if cached == digest else self.archive)


def test_the_shard_is_downloaded_once_then_read_from_the_cache_and_again_when_damaged(tmp_path: Path) -> None:
    archive = write_shard(_dataset(tmp_path / "public", 6), TASK, ["s1", "s3", "s4"])
    coordinator, state = Coordinator(archive), tmp_path / "state"
    state.mkdir()
    data = downloaded_shard(_local(tmp_path), state, coordinator.fetch)
    assert list(data.public.ids) == ["s1", "s3", "s4"] and coordinator.asked == [""]  # type: ignore[attr-defined]

    again = downloaded_shard(_local(tmp_path), state, coordinator.fetch)  # a restart
    digest = hashlib.sha256(archive).hexdigest()
    assert coordinator.asked == ["", digest] and list(again.public.ids) == ["s1", "s3", "s4"]  # type: ignore[attr-defined]

    np.save(state / SHARD_DIR / "v3.npy", np.zeros(2, dtype=np.float32))  # the disk changed a cached file
    repaired = downloaded_shard(_local(tmp_path), state, coordinator.fetch)
    assert coordinator.asked[-1] == ""  # the damaged cache is not offered as current
    np.testing.assert_array_equal(repaired.public.input_arrays()["v"][1], [3, -3])


def test_a_coordinator_without_a_public_set_leaves_the_device_without_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    data = downloaded_shard(_local(tmp_path), state, Coordinator(None).fetch)
    assert len(data.public) == 0 and not (state / SHARD_DIR).exists()


def _verdict(mismatches: dict[str, str]):  # type: ignore[no-untyped-def]
    def verify(samples: list[SampleFingerprint]) -> PublicCopyCheck:
        return PublicCopyCheck(True, len(samples) - len(mismatches), sorted(mismatches.items()))
    return verify


def test_a_copy_keeps_only_the_samples_the_coordinator_recognises(tmp_path: Path) -> None:
    copy = _dataset(tmp_path / "copy", 5)
    data = _local(tmp_path, copy)
    kept = checked_copy(data, copy, _verdict({"s2": "its v file differs from the coordinator's"}))
    assert list(kept.public.ids) == ["s0", "s1", "s3", "s4"] and kept.public_refused == 1  # type: ignore[attr-defined]
    assert checked_copy(data, copy, _verdict({})) is data
    assert checked_copy(data, copy, lambda samples: PublicCopyCheck(held=False)) is data


def test_a_copy_of_another_public_set_stops_the_agent_with_what_to_do(tmp_path: Path) -> None:
    copy = _dataset(tmp_path / "copy", 2)
    verdict = _verdict({"s0": "not in the coordinator's public set", "s1": "not in the coordinator's public set"})
    with pytest.raises(ConfigError, match=r"none of its 2 samples .*s0: not in the coordinator's public set.*remove "
                                          r"data.public to download"):
        checked_copy(_local(tmp_path, copy), copy, verdict)
