"""Whether an upload may be accepted: pure checks of its header and its bytes, no I/O, no metrics.

The upload path reads as one line: the transport turns messages into an ``UploadHeader`` and chunks ->
``UploadService`` stages the chunks and asks these checks -> the store accepts the update durably ->
aggregation adds it to the round's running sums (``server.services.aggregation``). Every refusal here is an
``UpdateRejectedError`` with a reason (counted and recorded by the service) or an ``InvalidRequestError`` for
a header that breaks the protocol.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mlecs.aggregation.robust import AggregationError, update_norm
from mlecs.codec import (
    MAX_HEADER_BYTES,
    CodecError,
    CodecKind,
    NonFiniteValuesError,
    decode_tensors,
    peek_header,
    sha256_hex,
)
from mlecs.tensor_names import FUSED_TENSOR, owning_modality
from server.domain.errors import InvalidRequestError, UpdateRejectedError
from server.domain.models import Update, reported_metrics_problem

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_PRECISION = {CodecKind.INT8.value: 0, CodecKind.FP16.value: 1, CodecKind.FP32.value: 2}
"""Codecs by precision: an update may use the federation's upload codec or a more precise one."""
HEADER_BYTES_PER_TENSOR = 512
"""Bytes an update's codec header may spend per tensor the schema has: an entry of a long name and four
dimensions takes about 150."""
MAX_SAMPLE_COUNT = 2**31 - 1
"""The most samples an upload may report per kind: what the database's integer columns hold."""


@dataclass(frozen=True)
class UploadHeader:
    round_id: str
    device_id: str
    upload_id: str
    codec: str
    total_size: int
    sha256: str
    modalities: frozenset[str]
    public_samples: int
    private_samples: int
    resume_offset: int
    base_version_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    fused_sample_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Schema:
    """What a federation's updates may hold: the adapter's tensors and the fused features' width."""

    tensors: Mapping[str, tuple[int, ...]]
    fused_width: int


def check_header(header: UploadHeader, max_upload_bytes: int) -> None:
    """The header's own fields: size within the coordinator's limit, a known codec, a digest, counts."""
    if header.total_size > max_upload_bytes:
        # Refused before a byte is staged; INVALID_ARGUMENT, since sending it again cannot succeed.
        raise UpdateRejectedError("upload_too_large", f"total_size {header.total_size} is over this coordinator's "
                                                      f"limit of {max_upload_bytes} bytes (max_upload_bytes)")
    problems = []
    if header.codec not in {c.value for c in CodecKind}:
        problems.append(f"unknown codec {header.codec!r}")
    if header.total_size <= 0:
        problems.append(f"total_size must be 1..{max_upload_bytes} bytes")
    if not _SHA256.match(header.sha256):
        problems.append("sha256 must be 64 lowercase hex digits")
    if not header.modalities:
        problems.append("modalities must not be empty")
    if header.public_samples + header.private_samples <= 0:
        # A device without a copy of the public set learns on private data alone: either count will do.
        problems.append("public_samples + private_samples must be > 0")
    for name in ("public_samples", "private_samples"):
        if getattr(header, name) > MAX_SAMPLE_COUNT:
            problems.append(f"{name} must be at most {MAX_SAMPLE_COUNT}")
    metrics_problem = reported_metrics_problem(header.metrics)
    if metrics_problem:
        problems.append(metrics_problem)
    if problems:
        raise InvalidRequestError("invalid upload header: " + "; ".join(problems))


def check_modalities(claimed: frozenset[str], enrolled: frozenset[str]) -> None:
    """An update may cover the modalities the device enrolled with, or fewer (a sensor can fail), never
    more: MMA weighs an update by its modality count and lists it among each modality's participants."""
    extra = sorted(claimed - enrolled)
    if extra:
        raise UpdateRejectedError(
            "modalities", f"the update claims {', '.join(extra)}, which this device did not enrol with "
            f"(enrolled: {', '.join(sorted(enrolled))}); enrol a device with those modalities")


def check_codec(codec: str, wanted: str) -> None:
    """The federation's upload codec or a more precise one: a device may not lower the precision asked for."""
    if _PRECISION[codec] < _PRECISION[wanted]:
        raise UpdateRejectedError("codec", f"codec {codec} is less precise than this federation's upload codec "
                                           f"{wanted}")


def check_fused_ids(ids: list[int], limit: int) -> None:
    if len(ids) > limit or len(set(ids)) != len(ids):
        raise InvalidRequestError(f"fused_sample_ids must be at most {limit} distinct public sample ids")


def check_payload(update: Update, data: bytes, schema: Schema, max_update_norm: float) -> dict[str, np.ndarray]:
    """Checks an upload's bytes against its header and the federation's schema; returns its tensors."""
    if len(data) != update.declared_size:
        raise UpdateRejectedError("size", f"received {len(data)} bytes, declared {update.declared_size}")
    if sha256_hex(data) != update.sha256:
        raise UpdateRejectedError("checksum", "sha256 of the received bytes differs from the header")
    # Names and shapes are checked from the header, before the payload is inflated; a header listing more
    # tensors than the schema has (and the fused features) is refused before its entries are parsed.
    expected = len(schema.tensors) + 1
    try:
        header = peek_header(data, max_tensors=expected, max_header_bytes=HEADER_BYTES_PER_TENSOR * expected)
    except CodecError as exc:
        raise UpdateRejectedError("codec", str(exc)) from exc
    if header.codec.value != update.codec:
        raise UpdateRejectedError("codec", "payload codec differs from the header")
    if not header.tensors:
        raise UpdateRejectedError("schema", "the update holds no tensors")
    # peek_header has already refused a payload larger than its tensors (the codec accepts only the encoder's
    # layout), so a small upload cannot inflate to gigabytes.
    _check_entries([(entry.name, tuple(entry.shape)) for entry in header.tensors], update, schema)
    try:
        # The payload itself: checksummed frame, consistent, finite; never inflated past what the header
        # (checked against the schema above) says it holds.
        tensors = decode_tensors(data, max_decoded_bytes=header.payload_bytes + 4 + MAX_HEADER_BYTES)
    except NonFiniteValuesError as exc:
        raise UpdateRejectedError("non_finite", str(exc)) from exc
    except CodecError as exc:
        raise UpdateRejectedError("codec", str(exc)) from exc
    check_norm(max_update_norm, tensors)
    return tensors


def _check_entries(entries: list[tuple[str, tuple[int, ...]]], update: Update, schema: Schema) -> None:
    fused_shape = (len(update.fused_sample_ids), schema.fused_width)
    if update.fused_sample_ids and FUSED_TENSOR not in {name for name, _ in entries}:
        raise UpdateRejectedError("schema", f"fused_sample_ids were declared but {FUSED_TENSOR!r} is missing")
    for name, shape in entries:
        if name == FUSED_TENSOR:
            if shape != fused_shape or not update.fused_sample_ids:
                raise UpdateRejectedError(
                    "schema", f"tensor {FUSED_TENSOR!r} has shape {shape}, expected {fused_shape} "
                    "(one row per declared fused_sample_id)")
            continue
        if name not in schema.tensors:
            raise UpdateRejectedError("schema", f"unexpected tensor {name!r}")
        if shape != tuple(schema.tensors[name]):
            raise UpdateRejectedError("schema", f"tensor {name!r} has shape {shape}, "
                                                f"expected {tuple(schema.tensors[name])}")
        owner = owning_modality(name)
        if owner is not None and owner not in update.modalities:
            raise UpdateRejectedError("schema", f"tensor {name!r} belongs to a modality the device lacks")


def check_norm(bound: float, tensors: Mapping[str, np.ndarray]) -> None:
    """Refuses an update whose delta (all adapter tensors, not the fused features) is longer than ``bound``."""
    if not bound:
        return
    try:
        norm = update_norm({name: t for name, t in tensors.items() if name != FUSED_TENSOR})
    except AggregationError as exc:
        raise UpdateRejectedError("norm_bound", str(exc)) from exc
    if norm > bound:
        raise UpdateRejectedError("norm_bound", f"the update's L2 norm {norm:.6g} is over this federation's "
                                                f"max_update_norm {bound:g}")
