"""The adapter codec: exact error bounds per codec, a strict decoder, determinism and chunking."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import zstandard

from mlecs.codec import (
    FORMAT_VERSION,
    MAGIC,
    CodecError,
    CodecKind,
    decode_tensors,
    encode_tensors,
    iter_chunks,
    max_abs_error_bound,
    peek_header,
    sha256_hex,
)


def _tensor_set(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "scalar": np.array(2.5, dtype=np.float32),
        "vector": rng.normal(size=17).astype(np.float32),
        "lora.A": rng.normal(scale=0.02, size=(8, 48)).astype(np.float32),
        "cube": rng.normal(size=(3, 4, 5)).astype(np.float32),
        "zero_rows": np.vstack([np.zeros((2, 6)), rng.normal(size=(1, 6))]).astype(np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _craft(header: dict[str, object], payload: bytes, *, version: int = FORMAT_VERSION) -> bytes:
    """Hand-built bytes in the wire layout, for feeding the decoder headers the encoder never writes."""
    header_bytes = json.dumps(header).encode()
    inner = struct.pack("<I", len(header_bytes)) + header_bytes + payload
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(inner)
    return MAGIC + struct.pack("<H", version) + frame


def _fp32_header(**entry_overrides: object) -> dict[str, object]:
    entry: dict[str, object] = {"name": "w", "shape": [2, 2], "dtype": "float32", "offset": 0, "nbytes": 16}
    entry.update(entry_overrides)
    return {"codec": "fp32", "payload_bytes": 16, "tensors": [entry]}


# ---------------------------------------------------------------------------------------------------
# Round trips and error bounds


@pytest.mark.parametrize("codec", list(CodecKind))
def test_round_trip_keeps_names_shapes_and_dtype(codec: CodecKind) -> None:
    tensors = _tensor_set()
    decoded = decode_tensors(encode_tensors(tensors, codec))
    assert sorted(decoded) == sorted(tensors)
    for name, original in tensors.items():
        assert decoded[name].shape == original.shape, name
        assert decoded[name].dtype == np.float32
        assert decoded[name].flags.writeable and decoded[name].flags.c_contiguous


def test_fp32_is_exact() -> None:
    tensors = _tensor_set()
    tensors["tiny"] = np.array([1e-45, -3e38, 3.4e38, 0.0, -0.0], dtype=np.float32)
    decoded = decode_tensors(encode_tensors(tensors, CodecKind.FP32))
    for name, original in tensors.items():
        np.testing.assert_array_equal(decoded[name], original)
        assert max_abs_error_bound(original, CodecKind.FP32) == 0.0


def test_fp16_error_within_half_an_ulp() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate(
        [
            rng.normal(scale=10.0, size=2000),
            rng.uniform(-6e-5, 6e-5, size=500),  # fp16 subnormals: absolute error up to 2**-25
            [65504.0, -65504.0, 0.0, 1.0, 2.0**-24, 3e-8],
        ]
    ).astype(np.float32)
    decoded = decode_tensors(encode_tensors({"x": values}, CodecKind.FP16))["x"]
    error = np.abs(decoded.astype(np.float64) - values.astype(np.float64))
    explicit_bound = 2.0**-11 * np.abs(values.astype(np.float64)) + 2.0**-25
    assert np.all(error <= explicit_bound)
    np.testing.assert_array_equal(max_abs_error_bound(values, CodecKind.FP16), explicit_bound)


def test_fp16_decodes_to_the_same_floats_with_or_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half floats are widened by torch where it is loaded and by numpy otherwise: bit for bit the same,
    subnormals and signed zeros included."""
    import sys

    import torch  # noqa: F401  (loaded, so the decoder may use it)

    every_half = np.arange(2**16, dtype=np.uint16).view(np.float16)
    finite = every_half[np.isfinite(every_half)].astype(np.float32).reshape(-1, 32)
    data = encode_tensors({"all": finite, "empty": np.zeros((0, 3), np.float32)}, CodecKind.FP16)
    with_torch = decode_tensors(data)
    monkeypatch.delitem(sys.modules, "torch")
    without_torch = decode_tensors(data)
    for name, values in with_torch.items():
        assert values.dtype == without_torch[name].dtype == np.float32
        assert values.flags.writeable
        np.testing.assert_array_equal(values.view(np.uint32), without_torch[name].view(np.uint32))
    np.testing.assert_array_equal(with_torch["all"], finite)


def test_int8_error_within_half_a_step_per_row() -> None:
    rng = np.random.default_rng(2)
    values = rng.normal(size=(64, 33)) * rng.uniform(1e-6, 1e3, size=(64, 1))
    values = values.astype(np.float32)
    decoded = decode_tensors(encode_tensors({"x": values}, CodecKind.INT8))["x"]
    scale = np.abs(values).max(axis=1, keepdims=True).astype(np.float64) / 127
    error = np.abs(decoded.astype(np.float64) - values)
    # Half a step, with float32 rounding of the stored scale and of q * scale as the only slack.
    assert np.all(error <= scale * (0.5 + 2.0**-16))
    assert np.all(error <= max_abs_error_bound(values, CodecKind.INT8))
    # Each row's extreme value survives almost exactly: it sits on the 127th step.
    row_max = np.abs(values).argmax(axis=1)
    np.testing.assert_allclose(decoded[np.arange(64), row_max], values[np.arange(64), row_max], rtol=1e-6)


@pytest.mark.parametrize(
    "values",
    [
        np.array(-3.25, dtype=np.float32),  # 0-d: one scale
        np.linspace(-1, 1, 11, dtype=np.float32),  # 1-d: one scale
        np.arange(60, dtype=np.float32).reshape(3, 4, 5) - 30,  # 3-d: one scale per first-axis row
        np.array([1e-45, -1e-45, 0.0], dtype=np.float32),  # subnormal row: scale must not underflow to 0
        np.array([[3.4e38, -3.4e38], [1e-40, 0.0]], dtype=np.float32),  # extremes of float32
    ],
)
def test_int8_bound_holds_for_every_shape_and_extreme(values: np.ndarray) -> None:
    decoded = decode_tensors(encode_tensors({"x": values}, "int8"))["x"]
    assert decoded.shape == values.shape
    error = np.abs(decoded.astype(np.float64) - values.astype(np.float64))
    assert np.all(error <= max_abs_error_bound(values, CodecKind.INT8))


def test_int8_all_zero_rows_decode_to_exact_zeros() -> None:
    values = np.zeros((4, 8), dtype=np.float32)
    values[2] = np.linspace(-1, 1, 8)
    decoded = decode_tensors(encode_tensors({"x": values}, CodecKind.INT8))["x"]
    np.testing.assert_array_equal(decoded[[0, 1, 3]], 0.0)
    assert np.all(np.asarray(max_abs_error_bound(values, CodecKind.INT8))[[0, 1, 3]] == 0.0)


def test_safe_integer_and_float64_inputs_are_converted() -> None:
    decoded = decode_tensors(
        encode_tensors(
            {
                "i": np.arange(-5, 5, dtype=np.int64),
                "u": np.array([0, 2**24], dtype=np.uint32),
                "d": np.ones(3),
            },
            CodecKind.FP32,
        )
    )
    np.testing.assert_array_equal(decoded["i"], np.arange(-5, 5))
    np.testing.assert_array_equal(decoded["u"], [0, 2**24])
    np.testing.assert_array_equal(decoded["d"], [1, 1, 1])


def test_float64_bound_includes_the_float32_conversion() -> None:
    values = np.random.default_rng(3).normal(size=(5, 7))
    for codec in CodecKind:
        decoded = decode_tensors(encode_tensors({"x": values}, codec))["x"]
        assert np.all(np.abs(decoded - values) <= max_abs_error_bound(values, codec))


# ---------------------------------------------------------------------------------------------------
# Encoder validation


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_naming_the_tensor(bad: float) -> None:
    with pytest.raises(CodecError, match=r"'blocks\.3\.lora_B'.*non-finite"):
        encode_tensors({"ok": np.ones(2), "blocks.3.lora_B": np.array([1.0, bad])}, CodecKind.FP32)


def test_fp16_overflow_is_refused_rather_than_becoming_inf() -> None:
    encode_tensors({"edge": np.array([65504.0, -65504.0])}, CodecKind.FP16)
    with pytest.raises(CodecError, match=r"'big'.*fp16 range"):
        encode_tensors({"big": np.array([1.0, 70000.0])}, CodecKind.FP16)
    # The same values are fine for codecs with the range to hold them.
    encode_tensors({"big": np.array([1.0, 70000.0])}, CodecKind.INT8)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"": np.ones(2)}, "empty"),
        ({"w": np.array([2**24 + 1], dtype=np.int64)}, "exactly"),
        ({"w": np.array([1 + 2j])}, "complex"),
        ({"w": np.array([True, False])}, "bool"),
        ({"w": np.array(["a"])}, "<U1"),
        ({"w": np.array([1e39])}, "float32 range"),
    ],
)
def test_unencodable_input_raises_codec_error(tensors: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(CodecError, match=message):
        encode_tensors(tensors, CodecKind.FP32)


def test_non_string_name_is_refused() -> None:
    with pytest.raises(CodecError, match="strings"):
        encode_tensors({3: np.ones(2)}, CodecKind.FP32)  # type: ignore[dict-item]


def test_bad_codec_and_level_are_caller_errors() -> None:
    with pytest.raises(ValueError, match="known codecs: fp32, fp16, int8"):
        encode_tensors({"w": np.ones(2)}, "bf16")
    with pytest.raises(ValueError, match="level"):
        encode_tensors({"w": np.ones(2)}, CodecKind.FP32, level=0)


# ---------------------------------------------------------------------------------------------------
# Determinism, header, compression


@pytest.mark.parametrize("codec", list(CodecKind))
def test_encoding_is_deterministic_and_independent_of_mapping_order(codec: CodecKind) -> None:
    tensors = _tensor_set()
    reordered = dict(reversed(list(tensors.items())))
    first = encode_tensors(tensors, codec)
    assert encode_tensors(tensors, codec) == first
    assert encode_tensors(reordered, codec) == first
    assert encode_tensors(_tensor_set(seed=1), codec) != first


def test_peek_header_describes_the_set_without_decoding() -> None:
    tensors = _tensor_set()
    data = encode_tensors(tensors, CodecKind.INT8)
    header = peek_header(data)
    assert header.version == FORMAT_VERSION
    assert header.codec is CodecKind.INT8
    assert header.names == tuple(sorted(tensors))
    assert header.shapes == {name: value.shape for name, value in tensors.items()}
    assert header.num_parameters == sum(value.size for value in tensors.values())
    cube = header.tensors[header.names.index("cube")]
    assert (cube.dtype, cube.nbytes, cube.scale_count) == ("int8", 60, 3)


def test_encoded_bytes_start_with_magic_and_version() -> None:
    data = encode_tensors({"w": np.ones(3)}, CodecKind.FP16)
    assert data[:4] == MAGIC
    assert struct.unpack("<H", data[4:6]) == (FORMAT_VERSION,)


def test_empty_set_round_trips() -> None:
    data = encode_tensors({}, CodecKind.INT8)
    assert decode_tensors(data) == {}
    assert peek_header(data).names == ()


def test_compressed_sizes_shrink_with_precision() -> None:
    # Gaussian values barely compress as float32 (random mantissas), so the codecs set the ratio.
    rng = np.random.default_rng(4)
    tensors = {f"layer{i}": rng.normal(scale=0.02, size=(160, 250)).astype(np.float32) for i in range(4)}
    sizes = {codec: len(encode_tensors(tensors, codec)) for codec in CodecKind}
    raw = sum(value.nbytes for value in tensors.values())
    assert sizes[CodecKind.FP32] <= raw * 1.01
    assert 1.8 <= sizes[CodecKind.FP32] / sizes[CodecKind.FP16] <= 2.5
    assert 3.5 <= sizes[CodecKind.FP32] / sizes[CodecKind.INT8] <= 6.0


def test_every_level_decodes_to_the_same_values() -> None:
    tensors = _tensor_set()
    reference = decode_tensors(encode_tensors(tensors, CodecKind.INT8, level=1))
    decoded = decode_tensors(encode_tensors(tensors, CodecKind.INT8, level=19))
    for name in tensors:
        np.testing.assert_array_equal(decoded[name], reference[name])


# ---------------------------------------------------------------------------------------------------
# Decoder: corrupt, truncated and hostile bytes only ever raise CodecError


def test_every_truncation_raises_codec_error() -> None:
    data = encode_tensors(_tensor_set(), CodecKind.INT8)
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            decode_tensors(data[:cut])


def test_every_single_byte_corruption_is_caught_or_harmless() -> None:
    tensors = _tensor_set()
    data = encode_tensors(tensors, CodecKind.FP16)
    reference = decode_tensors(data)
    for position in range(len(data)):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x5A
        try:
            decoded = decode_tensors(bytes(corrupted))
        except CodecError:
            continue
        # A few frame-header bits are ignored by zstd; flipping them must leave the content intact.
        assert decoded.keys() == reference.keys()
        for name in reference:
            np.testing.assert_array_equal(decoded[name], reference[name])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"MLT", "truncated"),
        (b"PK\x03\x04" + b"\x00" * 40, "magic"),
        (MAGIC + struct.pack("<H", 99) + b"\x00" * 20, "version 99"),
        (MAGIC + struct.pack("<H", FORMAT_VERSION) + b"not zstd at all", "corrupt"),
    ],
)
def test_foreign_bytes_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_tensors(data)
    with pytest.raises(CodecError):
        peek_header(data)


def test_trailing_bytes_after_the_frame_are_refused() -> None:
    data = encode_tensors({"w": np.ones(3)}, CodecKind.FP32)
    with pytest.raises(CodecError, match="unexpected bytes"):
        decode_tensors(data + b"\x00")


def test_frame_without_recorded_size_is_refused() -> None:
    inner = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x02\x00\x00\x00{}")
    with pytest.raises(CodecError, match="does not record its size"):
        decode_tensors(MAGIC + struct.pack("<H", FORMAT_VERSION) + inner)


def test_inflation_limit_is_enforced_before_decompressing() -> None:
    data = encode_tensors({"w": np.zeros(10_000, dtype=np.float32)}, CodecKind.FP32)
    assert len(data) < 200
    with pytest.raises(CodecError, match="over the limit"):
        decode_tensors(data, max_decoded_bytes=1000)


def test_crafted_valid_bytes_decode() -> None:
    payload = np.array([1, 2, 3, 4], dtype="<f4").tobytes()
    decoded = decode_tensors(_craft(_fp32_header(), payload))
    np.testing.assert_array_equal(decoded["w"], [[1, 2], [3, 4]])


@pytest.mark.parametrize(
    ("header", "payload_bytes", "message"),
    [
        (_fp32_header(offset=8), 16, "beyond the 16-byte payload"),
        (_fp32_header(nbytes=12), 16, "needs 16 bytes"),
        (_fp32_header(shape=[3, 2]), 16, "needs 24 bytes"),
        (_fp32_header(shape=[2, -2]), 16, "non-negative integer"),
        (_fp32_header(shape=[2.0, 2]), 16, "non-negative integer"),
        (_fp32_header(shape=[1] * 40), 16, "bad shape"),
        (_fp32_header(offset=True), 16, "non-negative integer"),
        (_fp32_header(dtype="float16"), 16, "needs float32"),
        (_fp32_header(name=""), 16, "bad tensor name"),
        (_fp32_header(extra=1), 16, "unexpected \\['extra'\\]"),
        ({"codec": "fp32", "payload_bytes": 16}, 16, "missing \\['tensors'\\]"),
        ({"codec": "bf16", "payload_bytes": 16, "tensors": []}, 16, "unknown codec"),
        ({"codec": "fp32", "payload_bytes": 16, "tensors": {}}, 16, "not a list"),
        ({**_fp32_header(shape=[2, 4], nbytes=32), "payload_bytes": 32}, 16, "declares 32 payload bytes, found 16"),
        # Only the encoder's layout: listed in name order, back to back, covering the whole payload.
        ({**_fp32_header(), "payload_bytes": 32}, 32, "the tensors cover 16 of the 32 payload bytes"),
        ({"codec": "fp32", "payload_bytes": 32, "tensors": [
            {"name": "v", "shape": [2, 2], "dtype": "float32", "offset": 16, "nbytes": 16},
            {"name": "w", "shape": [2, 2], "dtype": "float32", "offset": 0, "nbytes": 16}]}, 32,
         "tensor 'v' starts at byte 16, expected 0"),
        ({"codec": "fp32", "payload_bytes": 32, "tensors": [
            {"name": "w", "shape": [2, 2], "dtype": "float32", "offset": 0, "nbytes": 16},
            {"name": "v", "shape": [2, 2], "dtype": "float32", "offset": 16, "nbytes": 16}]}, 32,
         "not listed in name order"),
        ({**_fp32_header(offset=4), "payload_bytes": 20}, 20, "tensor 'w' starts at byte 4, expected 0"),
    ],
)
def test_inconsistent_headers_are_refused(
    header: dict[str, object], payload_bytes: int, message: str
) -> None:
    with pytest.raises(CodecError, match=message):
        decode_tensors(_craft(header, bytes(payload_bytes)))


def test_duplicate_names_are_refused() -> None:
    entry = _fp32_header()["tensors"][0]  # type: ignore[index]
    header = {"codec": "fp32", "payload_bytes": 16, "tensors": [entry, entry]}
    with pytest.raises(CodecError, match="twice"):
        decode_tensors(_craft(header, bytes(16)))


def test_header_that_is_not_json_or_overruns_the_frame_is_refused() -> None:
    prefix = MAGIC + struct.pack("<H", FORMAT_VERSION)
    compress = zstandard.ZstdCompressor(write_content_size=True).compress
    with pytest.raises(CodecError, match="not valid JSON"):
        decode_tensors(prefix + compress(struct.pack("<I", 4) + b"\xff{]x"))
    with pytest.raises(CodecError, match="header length"):
        decode_tensors(prefix + compress(struct.pack("<I", 1000) + b"{}"))
    with pytest.raises(CodecError, match="too short"):
        decode_tensors(prefix + compress(b"\x01"))


def test_non_finite_stored_values_are_refused() -> None:
    payload = np.array([1, np.nan, 3, 4], dtype="<f4").tobytes()
    with pytest.raises(CodecError, match="'w' has non-finite"):
        decode_tensors(_craft(_fp32_header(), payload))


def test_bad_int8_scales_and_values_are_refused() -> None:
    entry = {"name": "q", "shape": [2, 2], "dtype": "int8", "offset": 0, "nbytes": 4}
    header = {
        "codec": "int8",
        "payload_bytes": 12,
        "tensors": [{**entry, "scale_offset": 4, "scale_count": 2}],
    }
    good_scales = np.array([0.5, 1.0], dtype="<f4").tobytes()
    np.testing.assert_array_equal(
        decode_tensors(_craft(header, bytes([1, 2, 255, 4]) + good_scales))["q"], [[0.5, 1.0], [-1.0, 4.0]]
    )
    with pytest.raises(CodecError, match="negative or non-finite scales"):
        decode_tensors(_craft(header, bytes(4) + np.array([0.5, -1], dtype="<f4").tobytes()))
    with pytest.raises(CodecError, match=r"outside -127\.\.127"):
        decode_tensors(_craft(header, bytes([0, 0x80, 0, 0]) + good_scales))
    wrong_count = {**header, "tensors": [{**entry, "scale_offset": 4, "scale_count": 1}]}
    with pytest.raises(CodecError, match="1 scales for 2 rows"):
        decode_tensors(_craft(wrong_count, bytes(12)))


def test_decoder_never_leaks_other_exceptions_on_random_garbage() -> None:
    rng = np.random.default_rng(5)
    prefix = MAGIC + struct.pack("<H", FORMAT_VERSION)
    for _ in range(300):
        junk = rng.integers(0, 256, size=int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
        for data in (junk, prefix + junk, prefix + b"\x28\xb5\x2f\xfd" + junk):
            with pytest.raises(CodecError):
                decode_tensors(data)
            with pytest.raises(CodecError):
                peek_header(data)


# ---------------------------------------------------------------------------------------------------
# Transport helpers


def test_sha256_hex_matches_the_standard_vector() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    data = encode_tensors(_tensor_set(), CodecKind.FP16)
    assert sha256_hex(data) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_iter_chunks_reassembles_with_correct_offsets(chunk_size: int) -> None:
    data = encode_tensors(_tensor_set(), CodecKind.FP32)
    pieces = list(iter_chunks(data, chunk_size))
    assert b"".join(piece for _, piece in pieces) == data
    assert [offset for offset, _ in pieces] == list(range(0, len(data), chunk_size))
    assert all(len(piece) == chunk_size for _, piece in pieces[:-1])
    assert 0 < len(pieces[-1][1]) <= chunk_size


def test_iter_chunks_of_nothing_is_empty_and_bad_sizes_fail_at_once() -> None:
    assert list(iter_chunks(b"", 16)) == []
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            iter_chunks(b"abc", bad)
