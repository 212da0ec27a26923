"""Encoding a named set of float tensors (``encode_tensors``) and the error bound each codec keeps."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import zstandard

from mlecs.codec.format import (
    FORMAT_VERSION,
    FP16_MAX,
    HEADER_LEN,
    INT8_SLACK,
    MAGIC,
    MAX_NDIM,
    PREFIX,
    SCALE_DTYPE,
    STORED_DTYPE,
    WIRE_DTYPE,
    CodecError,
    CodecKind,
    scale_rows,
)


def encode_tensors(tensors: Mapping[str, np.ndarray], codec: CodecKind | str, *, level: int = 3) -> bytes:
    """Encodes named tensors into self-describing, zstd-compressed bytes.

    Values are taken as float32; integer tensors are accepted when every value converts exactly.
    Raises CodecError for an empty or non-string name, a non-finite value, an unsafe dtype, or (fp16)
    a value beyond the fp16 range, which would otherwise turn into inf and poison aggregation.
    ``level`` is the zstd level (1-22).
    """
    kind = _as_codec(codec)
    if not isinstance(level, int) or not 1 <= level <= 22:
        raise ValueError(f"zstd level must be an integer from 1 to 22, got {level!r}")

    entries: list[dict[str, Any]] = []
    pieces: list[bytes] = []
    offset = 0
    for name in _sorted_names(tensors):
        values = _as_float32(tensors[name], name)
        stored, scales = _store(values, kind, name)
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(values.shape),
            "dtype": STORED_DTYPE[kind],
            "offset": offset,
            "nbytes": len(stored),
        }
        pieces.append(stored)
        offset += len(stored)
        if kind is CodecKind.INT8:
            entry["scale_offset"], entry["scale_count"] = offset, len(scales) // SCALE_DTYPE.itemsize
            pieces.append(scales)
            offset += len(scales)
        entries.append(entry)

    header = {"codec": kind.value, "payload_bytes": offset, "tensors": entries}
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    inner = b"".join([HEADER_LEN.pack(len(header_bytes)), header_bytes, *pieces])
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return PREFIX.pack(MAGIC, FORMAT_VERSION) + compressor.compress(inner)


def _store(values: np.ndarray, kind: CodecKind, name: str) -> tuple[bytes, bytes]:
    """The tensor's stored bytes and (int8 only) its per-row scales as little-endian float32."""
    if kind is CodecKind.INT8:
        quantised, scales = _quantise_int8(values)
        return quantised.tobytes(), scales.astype(SCALE_DTYPE).tobytes()
    if kind is CodecKind.FP16:
        _check_fp16_range(values, name)
    return values.astype(WIRE_DTYPE[STORED_DTYPE[kind]]).tobytes(), b""


def _as_codec(codec: CodecKind | str) -> CodecKind:
    try:
        return CodecKind(codec)
    except ValueError:
        known = ", ".join(kind.value for kind in CodecKind)
        raise ValueError(f"unknown codec {codec!r}; known codecs: {known}") from None


def _sorted_names(tensors: Mapping[str, np.ndarray]) -> list[str]:
    for name in tensors:
        if not isinstance(name, str):
            raise CodecError(f"tensor names must be strings, got {name!r}")
        if not name:
            raise CodecError("tensor names must not be empty")
    return sorted(tensors)


def _as_float32(tensor: Any, name: str) -> np.ndarray:
    """The tensor as finite float32, converting integers only when no value changes."""
    array = np.asarray(tensor)
    if array.dtype.kind == "f":
        if array.dtype.itemsize > 4 and np.any(np.abs(array[np.isfinite(array)]) > np.finfo(np.float32).max):
            raise CodecError(f"tensor {name!r} has values beyond the float32 range")
        values = array.astype(np.float32, copy=False)
    elif array.dtype.kind in "iu":
        values = array.astype(np.float32)
        # float32 holds integers exactly only up to 2**24; larger ones would silently change.
        if not np.array_equal(values.astype(array.dtype), array):
            raise CodecError(f"tensor {name!r} of dtype {array.dtype} has values float32 cannot hold exactly")
    else:
        raise CodecError(f"tensor {name!r} has dtype {array.dtype}; only real numbers can be encoded")
    if array.ndim > MAX_NDIM:
        raise CodecError(f"tensor {name!r} has {array.ndim} dimensions; at most {MAX_NDIM} are supported")
    if not np.all(np.isfinite(values)):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise CodecError(f"tensor {name!r} has {bad} non-finite value(s) (nan or inf)")
    return values


def _check_fp16_range(values: np.ndarray, name: str) -> None:
    if values.size and float(np.max(np.abs(values))) > FP16_MAX:
        raise CodecError(
            f"tensor {name!r} has values beyond the fp16 range (|x| <= {FP16_MAX:g}); use fp32 or int8"
        )


def _int8_scales(values: np.ndarray) -> np.ndarray:
    """Per-row scales max|row| / 127 as float32, rounded up so that no row exceeds 127 steps."""
    rows = scale_rows(values.shape)
    flat = values.reshape(rows, values.size // rows if rows else 0)
    exact = np.max(np.abs(flat), axis=1, initial=0.0).astype(np.float64) / 127.0
    scales = exact.astype(np.float32)
    # Rounding down (or underflowing to 0 for tiny rows) would push max|row| past 127 steps.
    low = scales.astype(np.float64) < exact
    scales[low] = np.nextafter(scales[low], np.float32(np.inf))
    return scales


def _quantise_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scales = _int8_scales(values)
    rows = scales.shape[0]
    flat = values.reshape(rows, values.size // rows if rows else 0).astype(np.float64)
    # All-zero rows have scale 0 and only zeros to store; dividing by 1 keeps them 0 without a warning.
    divisor = np.where(scales > 0, scales, 1.0).astype(np.float64)[:, None]
    quantised = np.clip(np.rint(flat / divisor), -127, 127).astype(np.int8)
    return quantised.reshape(values.shape), scales


def max_abs_error_bound(tensor: np.ndarray, codec: CodecKind | str) -> np.ndarray | float:
    """The documented bound on ``|decode(encode(tensor)) - tensor|``, elementwise.

    - fp32: 0 for float32 input (lossless).
    - fp16: ``2**-11 * |x| + 2**-25`` (half an fp16 ulp; the constant covers fp16 subnormals).
    - int8: ``scale * (1/2 + 2**-16)`` with the row's ``scale = max|row| / 127``: half a quantisation
      step plus slack for float rounding of the reconstruction.

    For float64 input, the float32 conversion adds ``2**-24 * |x| + 2**-150``. Returns a float (0.0)
    for lossless cases, otherwise an array of the tensor's shape.
    """
    kind = _as_codec(codec)
    original = np.asarray(tensor)
    values = _as_float32(original, "tensor")
    bound: np.ndarray | float
    if kind is CodecKind.FP32:
        bound = 0.0
    elif kind is CodecKind.FP16:
        _check_fp16_range(values, "tensor")
        bound = 2.0**-11 * np.abs(values.astype(np.float64)) + 2.0**-25
    else:
        scales = _int8_scales(values).astype(np.float64) * (0.5 + INT8_SLACK)
        rows = scales.shape[0]
        per_row = np.broadcast_to(scales[:, None], (rows, values.size // rows if rows else 0))
        bound = per_row.reshape(values.shape).copy()
    if original.dtype.kind == "f" and original.dtype.itemsize > 4:
        bound = bound + 2.0**-24 * np.abs(original.astype(np.float64)) + 2.0**-150
    return bound
