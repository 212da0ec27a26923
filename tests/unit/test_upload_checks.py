"""The pure checks of the upload path: each refusal by its reason, without a store, a network or metrics."""

from __future__ import annotations

import numpy as np
import pytest

from mlecs.codec import encode_tensors, sha256_hex
from server.domain.errors import InvalidRequestError, UpdateRejectedError
from server.domain.models import Update
from server.services.upload_checks import (
    Schema,
    UploadHeader,
    check_codec,
    check_header,
    check_modalities,
    check_payload,
)

SCHEMA = Schema({"lora.l0.q.A": (2, 4), "extractors.image.w": (3,), "connector.core.b": (2,)}, fused_width=5)


def _header(**changes: object) -> UploadHeader:
    values: dict[str, object] = dict(round_id="r", device_id="d", upload_id="upload-1", codec="fp32", total_size=10,
                                     sha256="0" * 64, modalities=frozenset({"image"}), public_samples=1,
                                     private_samples=9, resume_offset=0, base_version_id="v")
    return UploadHeader(**(values | changes))  # type: ignore[arg-type]


def _upload(tensors: dict[str, np.ndarray], *, modalities: frozenset[str] = frozenset({"image"}),
            fused_ids: list[int] | None = None) -> tuple[Update, bytes]:
    data = encode_tensors(tensors, "fp32")
    update = Update(round_id="r", device_id="d", upload_id="upload-1", codec="fp32", declared_size=len(data),
                    sha256=sha256_hex(data), modalities=modalities, public_samples=1, private_samples=9,
                    fused_sample_ids=fused_ids or [])
    return update, data


def _good() -> dict[str, np.ndarray]:
    return {"lora.l0.q.A": np.ones((2, 4), np.float32), "extractors.image.w": np.ones(3, np.float32)}


def test_a_header_is_refused_with_every_problem_named_and_a_too_large_one_by_its_reason() -> None:
    check_header(_header(), max_upload_bytes=100)
    with pytest.raises(UpdateRejectedError) as too_large:
        check_header(_header(total_size=101), max_upload_bytes=100)
    assert too_large.value.reason == "upload_too_large"
    with pytest.raises(InvalidRequestError, match=r"unknown codec 'zip'.*sha256 must be.*must be > 0"):
        check_header(_header(codec="zip", sha256="xyz", public_samples=0, private_samples=0), max_upload_bytes=100)


def test_modalities_beyond_the_enrolment_and_a_lower_precision_are_refused() -> None:
    check_modalities(frozenset({"image"}), frozenset({"image", "audio"}))
    with pytest.raises(UpdateRejectedError, match="claims audio"):
        check_modalities(frozenset({"image", "audio"}), frozenset({"image"}))
    check_codec("fp32", "fp16")
    with pytest.raises(UpdateRejectedError, match="less precise"):
        check_codec("int8", "fp16")


def test_a_payload_that_matches_its_header_and_the_schema_is_returned_decoded() -> None:
    update, data = _upload(_good())
    tensors = check_payload(update, data, SCHEMA, max_update_norm=0)
    np.testing.assert_array_equal(tensors["extractors.image.w"], np.ones(3))


@pytest.mark.parametrize(("change", "reason", "message"), [
    ({"extra": np.ones(1, np.float32)}, "schema", "unexpected tensor 'extra'"),
    ({"lora.l0.q.A": np.ones((4, 2), np.float32)}, "schema", r"has shape \(4, 2\), expected \(2, 4\)"),
    ({"extractors.audio.w": np.ones(3, np.float32)}, "schema", "unexpected tensor"),
])
def test_a_payload_outside_the_schema_is_refused_by_reason(change: dict[str, np.ndarray], reason: str,
                                                           message: str) -> None:
    update, data = _upload(_good() | change)
    with pytest.raises(UpdateRejectedError, match=message) as refused:
        check_payload(update, data, SCHEMA, max_update_norm=0)
    assert refused.value.reason == reason


def test_a_tensor_of_a_modality_the_device_lacks_forged_bytes_and_a_long_delta_are_refused() -> None:
    update, data = _upload(_good(), modalities=frozenset({"audio"}))
    with pytest.raises(UpdateRejectedError, match="belongs to a modality the device lacks"):
        check_payload(update, data, SCHEMA, max_update_norm=0)
    update, data = _upload(_good())
    with pytest.raises(UpdateRejectedError, match="sha256") as forged:
        check_payload(update, data[:-1] + bytes([data[-1] ^ 1]), SCHEMA, max_update_norm=0)
    assert forged.value.reason == "checksum"
    with pytest.raises(UpdateRejectedError, match="L2 norm") as long:
        check_payload(update, data, SCHEMA, max_update_norm=1.0)  # sqrt(8 + 3) > 1
    assert long.value.reason == "norm_bound"


def test_fused_features_need_one_row_of_the_fused_width_per_declared_id() -> None:
    fused = {"fused.z": np.ones((2, 5), np.float32)}
    update, data = _upload(_good() | fused, fused_ids=[3, 7])
    assert check_payload(update, data, SCHEMA, max_update_norm=0)["fused.z"].shape == (2, 5)
    update, data = _upload(_good() | fused, fused_ids=[3])
    with pytest.raises(UpdateRejectedError, match="one row per declared fused_sample_id"):
        check_payload(update, data, SCHEMA, max_update_norm=0)
    update, data = _upload(_good(), fused_ids=[3])
    with pytest.raises(UpdateRejectedError, match=r"'fused\.z' is missing"):
        check_payload(update, data, SCHEMA, max_update_norm=0)
