"""The device side of the v1 wire: the messages a device sends, built in one place for the agent's client
(``edge_agent.client``) and the simulated devices of the benchmarks (``benchmarks.simdevice``), which differ
only in how they carry them (a blocking channel per agent; one asyncio channel for hundreds of devices)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from mlecs.codec import iter_chunks
from mlecs.proto.v1 import fleet_pb2 as pb

_LEGACY_MODALITY = {"image": pb.MODALITY_IMAGE, "audio": pb.MODALITY_AUDIO}
CODEC = {"fp32": pb.CODEC_FP32_ZSTD, "fp16": pb.CODEC_FP16_ZSTD, "int8": pb.CODEC_INT8_ZSTD}
CODEC_NAME = {value: name for name, value in CODEC.items()}


def credential(device_id: str, secret: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates a device."""
    return (("authorization", f"Device {device_id}:{secret}"),)


def _modalities(names: Iterable[str]) -> dict[str, list[Any]]:
    """Both spellings: the names, and the enum coordinators before 0.2 read (AV-MNIST's two modalities only)."""
    listed = list(names)
    return {"modalities": [_LEGACY_MODALITY[m] for m in listed if m in _LEGACY_MODALITY], "modality_names": listed}


def enrol_request(federation: str, device_name: str, modalities: Iterable[str], *, enrolment_token: str = "",
                  agent_version: str = "") -> pb.EnrolRequest:
    return pb.EnrolRequest(federation=federation, device_name=device_name, enrolment_token=enrolment_token,
                           agent_version=agent_version, **_modalities(modalities))


def upload_header(*, round_id: str, device_id: str, upload_id: str, codec: str, total_size: int, sha256: str,
                  modalities: Iterable[str], public_samples: int, private_samples: int, base_version_id: str,
                  resume_offset: int = 0, metrics: Mapping[str, float] | None = None,
                  fused_sample_ids: Iterable[int] = ()) -> pb.UploadHeader:
    return pb.UploadHeader(
        round_id=round_id, device_id=device_id, upload_id=upload_id, codec=CODEC[codec], total_size=total_size,
        sha256=sha256, samples=pb.SampleCounts(public_samples=public_samples, private_samples=private_samples),
        resume_offset=resume_offset, base_version_id=base_version_id, metrics=dict(metrics or {}),
        fused_sample_ids=list(fused_sample_ids), **_modalities(modalities))


def upload_messages(header: pb.UploadHeader, payload: bytes, chunk_bytes: int) -> Iterator[pb.UploadMessage]:
    """The upload stream: the header, then ``payload[header.resume_offset:]`` in chunks at their offsets."""
    yield pb.UploadMessage(header=header)
    start = header.resume_offset
    for offset, piece in iter_chunks(payload[start:], chunk_bytes):
        yield pb.UploadMessage(chunk=pb.UploadChunk(offset=start + offset, data=piece))
