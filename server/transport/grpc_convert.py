"""Conversions between protobuf messages and the coordinator's own types. Protobuf stops here."""

from __future__ import annotations

import json

from mlecs.datasets.public_shard import SampleFingerprint
from mlecs.proto.v1 import fleet_pb2 as pb
from server.domain.assignments import Assignment, StopAssignment, TrainAssignment, WaitAssignment
from server.domain.federation_config import CONFIG_SECTIONS, FederationConfig
from server.services.public_set import CopyCheck
from server.services.upload_checks import UploadHeader

_MODALITY_TO_NAME = {pb.MODALITY_IMAGE: "image", pb.MODALITY_AUDIO: "audio",
                     pb.MODALITY_TEXT: "text", pb.MODALITY_SENSOR: "sensor"}
_CODEC_TO_NAME = {pb.CODEC_FP32_ZSTD: "fp32", pb.CODEC_FP16_ZSTD: "fp16", pb.CODEC_INT8_ZSTD: "int8"}
_NAME_TO_CODEC: dict[str, pb.Codec.ValueType] = {v: k for k, v in _CODEC_TO_NAME.items()}
_UPLOAD_STAGE: dict[str, pb.UploadStage.ValueType] = {"private": pb.UPLOAD_STAGE_PRIVATE,
                                                      "public": pb.UPLOAD_STAGE_PUBLIC}


_MAX_MODALITY_NAMES = 16  # as many as a task may declare: one more is refused by the validator anyway
_MAX_MODALITY_NAME = 64


def modality_names(values: object) -> list[str]:
    """Proto modality enums -> names; unknown numbers become a name the validator will refuse."""
    return [_MODALITY_TO_NAME.get(v, f"unknown({v})") for v in values]  # type: ignore[attr-defined]


def requested_modalities(msg: pb.EnrolRequest | pb.UploadHeader) -> list[str]:
    """The modalities a device names: ``modality_names`` (any task's) when set, else the AV-MNIST enum values
    of agents before 0.2. Bounded in count and length, so a hostile list costs nothing to refuse."""
    if msg.modality_names:
        return [name[:_MAX_MODALITY_NAME] for name in msg.modality_names[: _MAX_MODALITY_NAMES + 1]]
    return modality_names(msg.modalities)


def codec_to_proto(name: str) -> pb.Codec.ValueType:
    return _NAME_TO_CODEC[name]


def upload_header_from_proto(msg: pb.UploadHeader) -> UploadHeader:
    return UploadHeader(
        round_id=msg.round_id,
        device_id=msg.device_id,
        upload_id=msg.upload_id,
        codec=_CODEC_TO_NAME.get(msg.codec, f"unknown({msg.codec})"),
        total_size=msg.total_size,
        sha256=msg.sha256,
        modalities=frozenset(requested_modalities(msg)),
        public_samples=msg.samples.public_samples,
        private_samples=msg.samples.private_samples,
        resume_offset=msg.resume_offset,
        base_version_id=msg.base_version_id,
        metrics=dict(msg.metrics),
        fused_sample_ids=list(msg.fused_sample_ids),
    )


_MAX_ID = 256  # longer ids or labels cannot match the coordinator's: cut, they are refused as unknown


def fingerprints_from_proto(msg: pb.VerifyPublicCopyRequest) -> list[SampleFingerprint]:
    return [SampleFingerprint(sample.id[:_MAX_ID], sample.label[:_MAX_ID],
                              {name[:_MAX_MODALITY_NAME]: digest[:_MAX_ID]
                               for name, digest in list(sample.file_sha256.items())[:_MAX_MODALITY_NAMES + 1]})
            for sample in msg.samples]


def copy_check_to_proto(check: CopyCheck | None) -> pb.VerifyPublicCopyResponse:
    if check is None:
        return pb.VerifyPublicCopyResponse(held=False)
    return pb.VerifyPublicCopyResponse(
        held=True, verified=check.verified,
        mismatches=[pb.PublicSampleMismatch(id=m.id, reason=m.reason) for m in check.mismatches])


_TRAIN_CONFIG_FIELDS = frozenset(field.name for field in pb.TrainConfig.DESCRIPTOR.fields)
_CONVERTED = {"upload_codec", "upload_stage", "model"}
"""Training fields the wire spells otherwise (an enum, a JSON string); the rest travel under their own names."""


def train_config(config: FederationConfig) -> pb.TrainConfig:
    """What a device is told to train with: the training section of the federation's config, every field the
    wire's TrainConfig has (the section is declared once, in ``FederationConfig``)."""
    plain = {name: getattr(config, name) for name in CONFIG_SECTIONS["training"]
             if name in _TRAIN_CONFIG_FIELDS and name not in _CONVERTED}
    return pb.TrainConfig(**plain, upload_codec=codec_to_proto(config.upload_codec),
                          upload_stage=_UPLOAD_STAGE[config.upload_stage],
                          model_config_json=json.dumps(config.model, sort_keys=True))


def assignment_to_proto(assignment: Assignment) -> pb.GetTaskResponse:
    match assignment:
        case TrainAssignment(round=round_, config=config):
            deadline_ms = int(round_.deadline_at.timestamp() * 1000) if round_.deadline_at else 0
            return pb.GetTaskResponse(train=pb.TrainTask(
                round_id=round_.id,
                round_number=round_.number,
                global_version_id=round_.base_version_id or "",
                deadline_unix_ms=deadline_ms,
                config=train_config(config),
            ))
        case WaitAssignment(retry_after_s=retry, reason=reason):
            return pb.GetTaskResponse(wait=pb.WaitTask(retry_after_s=retry, reason=reason))
        case StopAssignment(reason=reason):
            return pb.GetTaskResponse(stop=pb.StopTask(reason=reason))
    raise TypeError(f"unknown assignment {assignment!r}")
