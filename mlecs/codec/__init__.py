"""Turns a named set of float tensors (an adapter, anchors) into compact, checked bytes and back.

Wire layout, version 1 (all integers little-endian)::

    offset  size  field
    0       4     magic b"MLTS"
    4       2     format version (u16), currently 1
    6       ...   one zstd frame (records its content size and a content checksum) holding:
                    0      4   header length H (u32)
                    4      H   header: UTF-8 JSON, keys sorted, no whitespace
                    4+H    P   payload: the stored tensors back to back

The header is ``{"codec": ..., "payload_bytes": P, "tensors": [entry, ...]}`` with entries sorted by
name; each entry is ``{"name", "shape", "dtype", "offset", "nbytes"}`` locating the tensor's stored
values in the payload, and for int8 also ``{"scale_offset", "scale_count"}`` locating its per-row
float32 scales (kept in the payload: as decimal text in the JSON they would take about five times the
space). Stored dtypes are ``float32``, ``float16`` or ``int8``.

The magic and version sit outside the compressed frame so that foreign bytes are rejected before any
decompression. Encoding is deterministic: the same tensors, codec, level and zstandard version give
the same bytes, whatever order the mapping was built in.
"""

from mlecs.codec.decode import decode_tensors, peek_header
from mlecs.codec.encode import encode_tensors, max_abs_error_bound
from mlecs.codec.format import (
    FORMAT_VERSION,
    MAGIC,
    MAX_DECODED_BYTES,
    MAX_HEADER_BYTES,
    CodecError,
    CodecKind,
    NonFiniteValuesError,
    TensorEntry,
    TensorSetHeader,
)
from mlecs.codec.transfer import iter_chunks, sha256_hex

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_DECODED_BYTES",
    "MAX_HEADER_BYTES",
    "CodecError",
    "CodecKind",
    "NonFiniteValuesError",
    "TensorEntry",
    "TensorSetHeader",
    "decode_tensors",
    "encode_tensors",
    "iter_chunks",
    "max_abs_error_bound",
    "peek_header",
    "sha256_hex",
]
