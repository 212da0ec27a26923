"""The federation's one public set, as the coordinator hands it to devices and checks their copies of it.

A device gets its public shard in one of two ways:

* from the coordinator: a tar archive of a dataset directory (``manifest.csv``, the files it names and
  ``SHA256SUMS``), written byte for byte the same for the same samples, so that its sha256 names it and a
  device's cache is current when the digests agree;
* from its own copy of the public set (``[data] public``): the device sends a fingerprint per sample (id,
  label, sha256 of each modality's file) and the coordinator says which ones are samples of its set.

Torch-free: the coordinator, the agent and the tools share it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from mlecs.datasets.dataset import MANIFEST
from mlecs.tasks.spec import TaskSpec

CHECKSUMS = "SHA256SUMS"
"""In a shard: ``<sha256>  <path>`` per file, the manifest included (as ``sha256sum -c`` reads it)."""
MAX_SHARD_BYTES = 2 * 1024**3
"""The largest archive a device accepts (a public shard is a few hundred samples; this only bounds a fault)."""


class ShardError(Exception):
    """A shard archive or a cached shard directory is not what its checksums say."""


@dataclass(frozen=True)
class SampleFingerprint:
    """What identifies one public sample across copies: its id, label and each modality file's sha256."""

    id: str
    label: str
    files: Mapping[str, str] = field(default_factory=dict)
    """modality -> sha256 hex of its file's bytes (only the modalities this copy has)."""


@dataclass(frozen=True)
class Mismatch:
    id: str
    reason: str


def _inside(value: str) -> PurePosixPath | None:
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def _manifest_rows(directory: Path, task: TaskSpec) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The manifest's modality columns (of the task's) and its rows by id (first row of an id wins)."""
    with (directory / MANIFEST).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows: dict[str, dict[str, str]] = {}
        for row in reader:
            if None in row or any(value is None for value in row.values()):
                continue
            sample_id = str(row.get("id", "")).strip()
            if sample_id and sample_id not in rows:
                rows[sample_id] = {key: str(value).strip() for key, value in row.items() if key is not None}
    return [name for name in task.modalities if name in columns], rows


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprints(directory: Path, task: TaskSpec, ids: Iterable[str]) -> dict[str, SampleFingerprint]:
    """The fingerprint of each of ``ids`` (rows the dataset loader found usable) in ``directory``."""
    modalities, rows = _manifest_rows(directory, task)
    result = {}
    for sample_id in ids:
        row = rows[sample_id]
        files = {}
        for name in modalities:
            relative = _inside(row.get(name, ""))
            if relative is not None:
                files[name] = _sha256_file(directory / relative)
        result[sample_id] = SampleFingerprint(sample_id, row["label"], files)
    return result


def compare(reference: Mapping[str, SampleFingerprint], offered: Sequence[SampleFingerprint]) -> list[Mismatch]:
    """Every offered sample that is not a sample of ``reference``, with why. A copy may lack modalities the
    reference has (a device holds only its sensors'), never hold others or other bytes."""
    problems = []
    for sample in offered:
        known = reference.get(sample.id)
        if known is None:
            problems.append(Mismatch(sample.id, "not in the coordinator's public set"))
            continue
        if sample.label != known.label:
            problems.append(Mismatch(sample.id, f"label {sample.label!r}; the coordinator's is {known.label!r}"))
            continue
        for modality, digest in sorted(sample.files.items()):
            if modality not in known.files:
                problems.append(Mismatch(sample.id, f"has {modality}, which the coordinator's sample lacks"))
                break
            if digest != known.files[modality]:
                problems.append(Mismatch(sample.id, f"its {modality} file differs from the coordinator's"))
                break
    return problems


def shard_ids(ids: Sequence[str], samples: int, seed: int, device_id: str) -> list[str]:
    """The public samples one device gets: ``samples`` of ``ids``, drawn from the federation's seed and the
    device's id, so the same device gets the same shard on every call (its cache stays current) and devices
    get different ones; every id when ``samples`` is 0 or not below their number."""
    ordered = sorted(ids)
    if not samples or samples >= len(ordered):
        return ordered
    key = hashlib.sha256(f"{seed}:{device_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "big"))
    return sorted(ordered[i] for i in rng.choice(len(ordered), size=samples, replace=False))


def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: same samples, same bytes
    archive.addfile(info, io.BytesIO(data))


def write_shard(directory: Path, task: TaskSpec, ids: Sequence[str]) -> bytes:
    """A tar archive of the dataset directory holding only ``ids`` (sorted), with ``SHA256SUMS``."""
    modalities, rows = _manifest_rows(directory, task)
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["id", "label", "split", *modalities])
    files: dict[str, bytes] = {}
    for sample_id in sorted(ids):
        row = rows[sample_id]
        cells = []
        for name in modalities:
            relative = _inside(row.get(name, ""))
            cells.append("" if relative is None else str(relative))
            if relative is not None and str(relative) not in files:
                files[str(relative)] = (directory / relative).read_bytes()
        writer.writerow([sample_id, row["label"], row.get("split", "train"), *cells])
    members = {MANIFEST: manifest.getvalue().encode(), **dict(sorted(files.items()))}
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in members.items())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        _tar_member(archive, CHECKSUMS, sums.encode())
        for name, data in members.items():
            _tar_member(archive, name, data)
    return buffer.getvalue()


def extract_shard(archive: bytes, target: Path) -> None:
    """Unpacks a shard into ``target`` (which must not exist) and checks every file against ``SHA256SUMS``.
    Raises ShardError for an archive that is not a shard, leaves its directory or fails a checksum."""
    target.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            for member in tar.getmembers():
                if not member.isfile() or _inside(member.name) is None:
                    raise ShardError(f"the shard holds {member.name!r}, which is not a file inside it")
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ShardError(f"the shard archive cannot be unpacked: {exc}") from exc
    problems = check_shard_directory(target)
    if problems:
        raise ShardError("; ".join(problems[:5]))


def check_shard_directory(directory: Path) -> list[str]:
    """What is wrong with an unpacked shard (a file missing or changed since it was written); [] when intact."""
    try:
        lines = (directory / CHECKSUMS).read_text().splitlines()
    except OSError as exc:
        return [f"{CHECKSUMS} cannot be read: {exc}"]
    problems = []
    names = set()
    for line in lines:
        digest, _, name = line.partition("  ")
        names.add(name)
        relative = _inside(name)
        if relative is None:
            problems.append(f"{CHECKSUMS} names {name!r}, outside the shard")
            continue
        try:
            if _sha256_file(directory / relative) != digest:
                problems.append(f"{name} does not match its checksum")
        except OSError as exc:
            problems.append(f"{name} cannot be read: {exc.strerror}")
    if MANIFEST not in names:
        problems.append(f"{CHECKSUMS} does not cover {MANIFEST}")
    return problems
