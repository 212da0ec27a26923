"""Decoding and checking encoded tensor sets: ``decode_tensors``, and ``peek_header`` to read names and shapes
before inflating the payload."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np
import zstandard

from mlecs.codec.format import (
    FORMAT_VERSION,
    HEADER_LEN,
    MAGIC,
    MAX_DECODED_BYTES,
    MAX_HEADER_BYTES,
    MAX_NDIM,
    PREFIX,
    SCALE_DTYPE,
    STORED_DTYPE,
    WIRE_DTYPE,
    CodecError,
    CodecKind,
    NonFiniteValuesError,
    TensorEntry,
    TensorSetHeader,
    scale_rows,
)


def decode_tensors(data: bytes, *, max_decoded_bytes: int = MAX_DECODED_BYTES) -> dict[str, np.ndarray]:
    """Decodes bytes from encode_tensors into float32 arrays with the original names and shapes.

    Every check fails with a CodecError saying what is wrong: foreign or truncated bytes, an unknown
    format version, a corrupt frame (zstd checksum), an inconsistent header, or non-finite values.
    Refuses to inflate more than ``max_decoded_bytes``. The arrays are writable and finite.
    """
    body = _check_prefix(data)
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt tensor set: bad zstd frame header ({exc})") from None
    if declared < 0:
        raise CodecError("corrupt tensor set: the zstd frame does not record its size")
    if declared > max_decoded_bytes:
        raise CodecError(
            f"tensor set would inflate to {declared} bytes, over the limit of {max_decoded_bytes}"
        )
    # libzstd stops with an error if the frame produces more than it declared, so memory stays bounded.
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        inner = decompressor.decompress(body)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt tensor set: {exc}") from None
    if not decompressor.eof:
        raise CodecError("truncated tensor set: the zstd frame is incomplete")
    if decompressor.unused_data:
        raise CodecError(
            f"corrupt tensor set: {len(decompressor.unused_data)} unexpected bytes after the frame"
        )

    header, payload_start = _parse_inner_header(inner)
    payload = memoryview(inner)[payload_start:]
    if len(payload) != header.payload_bytes:
        raise CodecError(
            f"corrupt tensor set: header declares {header.payload_bytes} payload bytes, found {len(payload)}"
        )
    return {entry.name: _decode_entry(payload, entry) for entry in header.tensors}


def peek_header(data: bytes, *, max_tensors: int | None = None,
                max_header_bytes: int = MAX_HEADER_BYTES) -> TensorSetHeader:
    """Reads the codec, names and shapes of an encoded tensor set without inflating its payload.

    Lets a receiver check a set against its expected schema (and size) before decoding it. Validates
    the header as decode_tensors does, but not the payload or its checksum. A receiver that knows how many
    tensors it expects passes ``max_tensors`` and a matching ``max_header_bytes``: a header listing more is
    refused before its entries are parsed, so a small upload cannot buy seconds of CPU.
    """
    body = _check_prefix(data)
    reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=False)
    try:
        (length,) = HEADER_LEN.unpack(_read_exact(reader, HEADER_LEN.size))
        limit = min(max_header_bytes, MAX_HEADER_BYTES)
        if length > limit:
            raise CodecError(f"corrupt tensor set: header length {length} exceeds {limit}")
        header_bytes = _read_exact(reader, length)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt tensor set: {exc}") from None
    return _parse_header_json(header_bytes, max_tensors)


def _check_prefix(data: bytes) -> bytes:
    """The compressed body after a valid magic and version."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < PREFIX.size:
        raise CodecError(
            f"truncated tensor set: {len(data)} bytes is shorter than the {PREFIX.size}-byte prefix"
        )
    magic, version = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"not an encoded tensor set: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"unsupported tensor set format version {version}; this build reads {FORMAT_VERSION}"
        )
    return data[PREFIX.size :]


def _read_exact(reader: Any, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = reader.read(remaining)
        if not chunk:
            raise CodecError(f"truncated tensor set: header needs {size} bytes, frame ended early")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _parse_inner_header(inner: bytes) -> tuple[TensorSetHeader, int]:
    """The header at the start of the decompressed frame, and where the payload starts."""
    if len(inner) < HEADER_LEN.size:
        raise CodecError("corrupt tensor set: frame too short to hold a header length")
    (length,) = HEADER_LEN.unpack_from(inner)
    end = HEADER_LEN.size + length
    if length > MAX_HEADER_BYTES or end > len(inner):
        raise CodecError(f"corrupt tensor set: header length {length} exceeds the {len(inner)}-byte frame")
    return _parse_header_json(inner[HEADER_LEN.size : end]), end


def _parse_header_json(raw: bytes, max_tensors: int | None = None) -> TensorSetHeader:
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CodecError(f"corrupt tensor set: header is not valid JSON ({exc})") from None
    _expect_keys(document, {"codec", "payload_bytes", "tensors"}, "header")
    try:
        codec = CodecKind(document["codec"])
    except ValueError:
        raise CodecError(f"corrupt tensor set: unknown codec {document['codec']!r}") from None
    payload_bytes = _expect_count(document["payload_bytes"], "payload_bytes")
    if not isinstance(document["tensors"], list):
        raise CodecError("corrupt tensor set: 'tensors' is not a list")
    if max_tensors is not None and len(document["tensors"]) > max_tensors:
        raise CodecError(f"the tensor set lists {len(document['tensors'])} tensors, more than the "
                         f"{max_tensors} expected")

    entries: list[TensorEntry] = []
    seen: set[str] = set()
    for item in document["tensors"]:
        entry = _parse_entry(item, codec, payload_bytes)
        if entry.name in seen:
            raise CodecError(f"corrupt tensor set: tensor {entry.name!r} appears twice")
        seen.add(entry.name)
        entries.append(entry)
    _expect_canonical_layout(entries, payload_bytes)
    return TensorSetHeader(FORMAT_VERSION, codec, payload_bytes, tuple(entries))


def _expect_canonical_layout(entries: list[TensorEntry], payload_bytes: int) -> None:
    """Refuses any layout but the encoder's: tensors in name order, back to back, covering the payload.

    Other layouts can decode to the same tensors (entries listed in another order) or leave payload
    bytes that no tensor reads, a place to carry anything past validation; one encoding per tensor set
    also makes "these bytes are that update" checkable.
    """
    names = [entry.name for entry in entries]
    if names != sorted(names):
        raise CodecError("corrupt tensor set: tensors are not listed in name order")
    expected = 0
    for entry in entries:
        if entry.offset != expected:
            raise CodecError(f"corrupt tensor set: tensor {entry.name!r} starts at byte {entry.offset}, "
                             f"expected {expected} (tensors lie back to back)")
        expected += entry.nbytes
        if entry.scale_count:
            if entry.scale_offset != expected:
                raise CodecError(f"corrupt tensor set: the scales of {entry.name!r} start at byte "
                                 f"{entry.scale_offset}, expected {expected}")
            expected += entry.scale_count * SCALE_DTYPE.itemsize
    if expected != payload_bytes:
        raise CodecError(f"corrupt tensor set: the tensors cover {expected} of the {payload_bytes} payload bytes")


def _parse_entry(item: Any, codec: CodecKind, payload_bytes: int) -> TensorEntry:
    base = {"name", "shape", "dtype", "offset", "nbytes"}
    _expect_keys(item, base | {"scale_offset", "scale_count"} if codec is CodecKind.INT8 else base, "entry")
    name = item["name"]
    if not isinstance(name, str) or not name:
        raise CodecError(f"corrupt tensor set: bad tensor name {name!r}")
    shape = item["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise CodecError(f"corrupt tensor set: tensor {name!r} has a bad shape {shape!r}")
    dims = tuple(_expect_count(dim, f"shape of {name!r}") for dim in shape)
    dtype = STORED_DTYPE[codec]
    if item["dtype"] != dtype:
        raise CodecError(
            f"corrupt tensor set: tensor {name!r} stored as {item['dtype']!r}, codec {codec} needs {dtype}"
        )
    offset = _expect_count(item["offset"], f"offset of {name!r}")
    nbytes = _expect_count(item["nbytes"], f"nbytes of {name!r}")
    expected = math.prod(dims) * WIRE_DTYPE[dtype].itemsize
    if nbytes != expected:
        raise CodecError(
            f"corrupt tensor set: tensor {name!r} of shape {dims} needs {expected} bytes, "
            f"header says {nbytes}"
        )
    _expect_within(offset, nbytes, payload_bytes, name)
    entry = TensorEntry(name, dims, dtype, offset, nbytes)
    if codec is CodecKind.INT8:
        scale_offset = _expect_count(item["scale_offset"], f"scale_offset of {name!r}")
        scale_count = _expect_count(item["scale_count"], f"scale_count of {name!r}")
        if scale_count != scale_rows(dims):
            raise CodecError(
                f"corrupt tensor set: tensor {name!r} has {scale_count} scales for {scale_rows(dims)} rows"
            )
        _expect_within(scale_offset, scale_count * SCALE_DTYPE.itemsize, payload_bytes, name)
        entry = TensorEntry(name, dims, dtype, offset, nbytes, scale_offset, scale_count)
    return entry


def _expect_keys(item: Any, keys: set[str], what: str) -> None:
    if not isinstance(item, dict):
        raise CodecError(f"corrupt tensor set: {what} is not a JSON object")
    if set(item) != keys:
        missing, extra = sorted(keys - set(item)), sorted(set(item) - keys)
        raise CodecError(f"corrupt tensor set: {what} keys wrong (missing {missing}, unexpected {extra})")


def _expect_count(value: Any, what: str) -> int:
    # bool is an int in Python, but `true` is never a valid count.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CodecError(f"corrupt tensor set: {what} must be a non-negative integer, got {value!r}")
    return value


def _expect_within(offset: int, nbytes: int, payload_bytes: int, name: str) -> None:
    if offset + nbytes > payload_bytes:
        raise CodecError(
            f"corrupt tensor set: tensor {name!r} spans bytes {offset}..{offset + nbytes}, "
            f"beyond the {payload_bytes}-byte payload"
        )


def _decode_entry(payload: memoryview, entry: TensorEntry) -> np.ndarray:
    stored = np.frombuffer(payload, dtype=WIRE_DTYPE[entry.dtype], count=entry.size, offset=entry.offset)
    if entry.dtype == "int8":
        if np.any(stored == -128):
            raise CodecError(f"corrupt tensor set: tensor {entry.name!r} has int8 values outside -127..127")
        scales = np.frombuffer(
            payload, dtype=SCALE_DTYPE, count=entry.scale_count, offset=entry.scale_offset
        )
        if not np.all(np.isfinite(scales) & (scales >= 0)):
            raise CodecError(f"corrupt tensor set: tensor {entry.name!r} has negative or non-finite scales")
        rows = entry.scale_count
        flat = stored.reshape(rows, entry.size // rows if rows else 0).astype(np.float32)
        flat *= scales.astype(np.float32)[:, None]
        values = flat.reshape(entry.shape)
    else:
        values = (_widen_half(stored) if entry.dtype == "float16" else stored.astype(np.float32)).reshape(entry.shape)
        # fp32/fp16 bytes can spell nan or inf; the encoder never writes them, so they mean tampering.
        if not np.all(np.isfinite(values)):
            raise NonFiniteValuesError(f"corrupt tensor set: tensor {entry.name!r} has non-finite values")
    return values


def _widen_half(stored: np.ndarray) -> np.ndarray:
    """float16 values as a new float32 array (exact either way).

    numpy widens half floats one element at a time (about 4 ns each here, 5 ms for a 1.3 M-value update);
    torch uses the CPU's conversion instructions, eight times faster. The coordinator and the agents
    already have torch loaded, so it is used where it is; this module itself never imports it.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return stored.astype(np.float32)
    # A copy first: ``stored`` views the read-only decompressed bytes, which torch will not wrap.
    return torch.from_numpy(stored.copy()).to(torch.float32).numpy()
