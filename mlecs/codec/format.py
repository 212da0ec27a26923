"""The encoded tensor set's format: constants, codec kinds, errors and the header's records
(the layout is described in ``mlecs.codec``)."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

MAGIC = b"MLTS"
FORMAT_VERSION = 1
# Refuse to inflate more than this by default: a few bytes of zstd can declare gigabytes. Adapters and
# anchors are megabytes; callers that know their schema pass a tighter limit.
MAX_DECODED_BYTES = 1 << 31
# The header is a few KiB for real adapters; a larger one is corrupt or hostile.
MAX_HEADER_BYTES = 16 << 20

PREFIX = struct.Struct("<4sH")
HEADER_LEN = struct.Struct("<I")
MAX_NDIM = 32
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
# The int8 reconstruction q * scale is rounded once to float32 (|q| <= 127 < 2**7, so that rounding is
# below 2**-17 * scale) and the rounding decision x / scale is made in float64; 2**-16 covers both.
INT8_SLACK = 2.0**-16


class CodecKind(StrEnum):
    """How tensor values are stored: lossless float32, half precision, or int8 with per-row scales."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class CodecError(ValueError):
    """The tensors cannot be encoded, or the bytes are not a valid encoded tensor set.

    The message says what is wrong (naming the tensor where there is one). Not retryable: the same
    input fails the same way every time.
    """


class NonFiniteValuesError(CodecError):
    """Encoded bytes decode to NaN or Inf (the encoder never writes them): a poisoned or forged update."""


STORED_DTYPE: dict[CodecKind, str] = {
    CodecKind.FP32: "float32",
    CodecKind.FP16: "float16",
    CodecKind.INT8: "int8",
}
WIRE_DTYPE: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
}
SCALE_DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's stored values (and, for int8, its per-row scales) sit in the payload."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int
    scale_offset: int = 0  # int8 only; 0 with scale_count 0 otherwise
    scale_count: int = 0

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorSetHeader:
    """What an encoded tensor set holds: its codec and each tensor's name and shape, in name order."""

    version: int
    codec: CodecKind
    payload_bytes: int
    tensors: tuple[TensorEntry, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names, sorted."""
        return tuple(entry.name for entry in self.tensors)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each tensor by name."""
        return {entry.name: entry.shape for entry in self.tensors}

    @property
    def num_parameters(self) -> int:
        """Total number of elements over all tensors."""
        return sum(entry.size for entry in self.tensors)


def scale_rows(shape: tuple[int, ...]) -> int:
    """Number of int8 scale rows: the first axis, or a single row for 0-d and 1-d tensors."""
    return shape[0] if len(shape) >= 2 else 1
