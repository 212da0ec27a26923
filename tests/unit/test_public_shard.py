"""The public set as devices get it: shards drawn per device, archives that name themselves by their digest
and check every file, and fingerprints that tell a faithful copy of a public sample from any other."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mlecs.datasets import load_dataset
from mlecs.datasets.public_shard import (
    CHECKSUMS,
    SampleFingerprint,
    ShardError,
    check_shard_directory,
    compare,
    extract_shard,
    fingerprints,
    shard_ids,
    write_shard,
)
from mlecs.tasks import parse_task

TASK = parse_task('name = "pair"\nlabels = ["a", "b"]\n[modalities.v]\nkind = "vector"\ndim = 2\n'
                  '[modalities.w]\nkind = "vector"\ndim = 3\n[model]\nbackbone = "tiny"\n', "pair")


def _dataset(directory: Path, rows: int) -> Path:
    """Sample i has v always and w when i is even; labels alternate."""
    directory.mkdir(parents=True)
    lines = ["id,label,split,v,w"]
    for i in range(rows):
        np.save(directory / f"v{i}.npy", np.array([i, -i], dtype=np.float32))
        w = ""
        if i % 2 == 0:
            w = f"w{i}.npy"
            np.save(directory / w, np.full(3, i, dtype=np.float32))
        lines.append(f"s{i},{'ab'[i % 2]},train,v{i}.npy,{w}")
    (directory / "manifest.csv").write_text("\n".join(lines) + "\n")
    return directory


def test_a_device_gets_the_same_shard_every_time_and_devices_get_different_ones() -> None:
    ids = [f"s{i}" for i in range(100)]
    first = shard_ids(ids, 10, seed=3, device_id="dev-a")
    assert len(first) == 10 == len(set(first)) and set(first) <= set(ids)
    assert shard_ids(list(reversed(ids)), 10, seed=3, device_id="dev-a") == first  # not the listing order
    assert shard_ids(ids, 10, seed=3, device_id="dev-b") != first
    assert shard_ids(ids, 10, seed=4, device_id="dev-a") != first
    assert shard_ids(ids, 0, seed=3, device_id="dev-a") == sorted(ids)  # 0: the whole set
    assert shard_ids(ids, 500, seed=3, device_id="dev-a") == sorted(ids)


def test_a_shard_unpacks_to_a_dataset_directory_holding_exactly_its_samples(tmp_path: Path) -> None:
    source = _dataset(tmp_path / "public", 8)
    archive = write_shard(source, TASK, ["s4", "s1", "s2"])
    assert write_shard(source, TASK, ["s1", "s2", "s4"]) == archive  # same samples, same bytes (and digest)
    extract_shard(archive, tmp_path / "shard")
    shard, report = load_dataset(tmp_path / "shard", TASK)
    whole, _ = load_dataset(source, TASK)
    assert list(shard.ids) == ["s1", "s2", "s4"] and report.problems == []
    rows = [list(whole.ids).index(i) for i in shard.ids]
    np.testing.assert_array_equal(shard.inputs["v"], whole.inputs["v"][rows])
    np.testing.assert_array_equal(shard.present["w"], [False, True, True])
    assert check_shard_directory(tmp_path / "shard") == []


def test_a_cached_shard_whose_file_changed_or_vanished_is_reported(tmp_path: Path) -> None:
    extract_shard(write_shard(_dataset(tmp_path / "public", 4), TASK, ["s0", "s1"]), tmp_path / "shard")
    np.save(tmp_path / "shard" / "v1.npy", np.zeros(2, dtype=np.float32))
    (tmp_path / "shard" / "w0.npy").unlink()
    problems = check_shard_directory(tmp_path / "shard")
    assert any("v1.npy does not match its checksum" in p for p in problems), problems
    assert any(p.startswith("w0.npy cannot be read") for p in problems), problems


def _rewrite(archive: bytes, change: dict[str, bytes]) -> bytes:
    """The archive with some members' bytes replaced (or added), SHA256SUMS left as it was."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(archive)) as source, tarfile.open(fileobj=out, mode="w") as target:
        members = {m.name: source.extractfile(m).read() for m in source.getmembers()}  # type: ignore[union-attr]
        for name, data in (members | change).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            target.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_an_archive_that_fails_its_checksums_or_leaves_its_directory_is_refused(tmp_path: Path) -> None:
    archive = write_shard(_dataset(tmp_path / "public", 4), TASK, ["s0", "s1"])
    with pytest.raises(ShardError, match=r"v0\.npy does not match its checksum"):
        extract_shard(_rewrite(archive, {"v0.npy": b"forged"}), tmp_path / "a")
    with pytest.raises(ShardError, match="not a file inside it"):
        extract_shard(_rewrite(archive, {"../escape.npy": b"x"}), tmp_path / "b")
    assert not (tmp_path / "escape.npy").exists()
    with pytest.raises(ShardError, match="cannot be unpacked"):
        extract_shard(b"not a tar archive at all" * 40, tmp_path / "c")
    with pytest.raises(ShardError, match=f"{CHECKSUMS} cannot be read"):
        no_sums = io.BytesIO()
        with tarfile.open(fileobj=no_sums, mode="w") as target:
            info = tarfile.TarInfo("manifest.csv")
            target.addfile(info, io.BytesIO(b""))
        extract_shard(no_sums.getvalue(), tmp_path / "d")


def test_a_faithful_copy_matches_and_every_kind_of_difference_is_named(tmp_path: Path) -> None:
    public = _dataset(tmp_path / "public", 6)
    reference = fingerprints(public, TASK, [f"s{i}" for i in range(6)])
    assert reference["s0"].label == "a" and set(reference["s0"].files) == {"v", "w"}
    assert set(reference["s1"].files) == {"v"}

    copy = tmp_path / "copy"
    shutil.copytree(public, copy)
    offered = fingerprints(copy, TASK, [f"s{i}" for i in range(6)])
    assert compare(reference, list(offered.values())) == []

    # A device holding only one modality of a sample still holds that sample.
    partial = SampleFingerprint("s0", "a", {"v": reference["s0"].files["v"]})
    np.save(copy / "v2.npy", np.array([9, 9], dtype=np.float32))  # other bytes under the same name
    changed = fingerprints(copy, TASK, ["s2"])["s2"]
    offered_copy = [partial, changed, SampleFingerprint("s3", "a", dict(reference["s3"].files)),
                    SampleFingerprint("s1", "b", {"v": reference["s1"].files["v"], "w": "0" * 64}),
                    SampleFingerprint("elsewhere", "a", {})]
    reasons = {m.id: m.reason for m in compare(reference, offered_copy)}
    assert reasons == {"s2": "its v file differs from the coordinator's",
                       "s3": "label 'a'; the coordinator's is 'b'",
                       "s1": "has w, which the coordinator's sample lacks",
                       "elsewhere": "not in the coordinator's public set"}
