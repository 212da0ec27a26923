"""The device's share of the federation's public set: its shard, downloaded from the coordinator and cached in
the state directory, or the device's own copy (``[data] public``), whose samples the coordinator checks.

Partition mode (the bundled AV-MNIST) computes its public shard from the partition and skips both.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_agent.config import ConfigError
from edge_agent.tasks import PublicCopyCheck, PublicShard
from edge_agent.trainer import LocalData
from mlecs.datasets import DatasetError, load_dataset
from mlecs.datasets.public_shard import (
    SampleFingerprint,
    ShardError,
    check_shard_directory,
    extract_shard,
    fingerprints,
)

log = logging.getLogger("mlecs.agent")

SHARD_DIR = "public-shard"
"""Under the state directory: the unpacked shard (a dataset directory with ``SHA256SUMS``)."""
SHARD_DIGEST = "public-shard.sha256"
"""Under the state directory: the sha256 of the archive the cached shard came from."""
_LOGGED_MISMATCHES = 20


def downloaded_shard(data: LocalData, state_dir: Path, fetch: Callable[[str], PublicShard]) -> LocalData:
    """``data`` with its public set replaced by the coordinator's shard for this device (kept in ``state_dir``,
    downloaded again only when the coordinator's shard changed or the cached copy fails its checksums)."""
    directory, digest_file = state_dir / SHARD_DIR, state_dir / SHARD_DIGEST
    cached = _cached_digest(directory, digest_file)
    shard = fetch(cached)
    if not shard.held:
        log.info("the coordinator holds no public set for this federation's task: training without public samples "
                 "(no SE-CCL sample anchors, no fused uploads)")
        return data
    if shard.archive is not None:
        staging = state_dir / (SHARD_DIR + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            extract_shard(shard.archive, staging)
        except ShardError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ConfigError(f"the coordinator's public shard is unusable: {exc}") from exc
        digest_file.unlink(missing_ok=True)  # never a digest naming a directory half replaced
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
        tmp = digest_file.with_suffix(".tmp")
        tmp.write_text(shard.sha256 + "\n")
        tmp.replace(digest_file)
        log.info("public shard downloaded: %d samples, %d bytes (sha256 %s)", shard.samples, len(shard.archive),
                 shard.sha256[:12])
    else:
        log.info("public shard cached in %s is current (%d samples)", directory, shard.samples)
    assert data.task is not None
    try:
        public, report = load_dataset(directory, data.task)
    except DatasetError as exc:
        raise ConfigError(f"the coordinator's public shard does not fit this device's data.task: {exc}") from exc
    for problem in report.problems:
        log.warning("public shard: %s", problem.describe())
    return dataclasses.replace(data, public=public)


def _cached_digest(directory: Path, digest_file: Path) -> str:
    """The archive digest of an intact cached shard, "" when there is none (a damaged one is removed)."""
    if not directory.is_dir() or not digest_file.is_file():
        return ""
    problems = check_shard_directory(directory)
    if problems:
        log.warning("cached public shard %s is damaged (%s); downloading it again", directory, problems[0])
        shutil.rmtree(directory, ignore_errors=True)
        digest_file.unlink(missing_ok=True)
        return ""
    return digest_file.read_text().strip()


def checked_copy(data: LocalData, copy_dir: Path, verify: Callable[[list[SampleFingerprint]], PublicCopyCheck]
                 ) -> LocalData:
    """``data`` keeping only the public samples the coordinator recognises as its own (same id, label and
    file bytes). Raises ConfigError when it recognises none: the copy is of another public set."""
    assert data.task is not None
    public = data.public
    ids = [str(i) for i in public.ids]  # type: ignore[attr-defined]  # a dataset directory's MultimodalData
    check = verify(list(fingerprints(copy_dir, data.task, ids).values()))
    if not check.held:
        log.warning("the coordinator holds no public set to check data.public %s against: using the copy as it is",
                    copy_dir)
        return data
    if not check.mismatches:
        log.info("data.public %s: all %d samples verified by the coordinator", copy_dir, check.verified)
        return data
    for sample_id, reason in check.mismatches[:_LOGGED_MISMATCHES]:
        log.warning("data.public %s: sample %s left out: %s", copy_dir, sample_id, reason)
    if len(check.mismatches) > _LOGGED_MISMATCHES:
        log.warning("data.public %s: %d more samples left out", copy_dir, len(check.mismatches) - _LOGGED_MISMATCHES)
    if not check.verified:
        first_id, first_reason = check.mismatches[0]
        raise ConfigError(f"data.public {copy_dir}: none of its {len(ids)} samples is a sample of the coordinator's "
                          f"public set (e.g. {first_id}: {first_reason}); remove data.public to download this "
                          "device's shard from the coordinator, or copy the right public set")
    refused = {sample_id for sample_id, _ in check.mismatches}
    keep = np.asarray([i for i, sample_id in enumerate(ids) if sample_id not in refused], dtype=np.int64)
    log.info("data.public %s: %d of %d samples verified by the coordinator", copy_dir, len(keep), len(ids))
    return dataclasses.replace(data, public=public.subset(keep), public_refused=len(refused))
