"""The anchor generator: what the coordinator publishes beside each global adapter.

Text anchors (MiniLM embeddings of the class descriptions) do not depend on the devices or the round,
so they are computed once per process and stored once (content-addressed); their cost does not grow
with the fleet. Fused-representation anchors from the cloud model join them with SE-CCL.
"""

from __future__ import annotations

import threading

import numpy as np

from mlecs.codec import CodecKind, encode_tensors

_lock = threading.Lock()
_cached: bytes | None = None


def encoded_text_anchors() -> bytes:
    """The encoded anchor set ``{"text.class": [num_classes, 384]}``, computed on first use."""
    global _cached
    with _lock:
        if _cached is None:
            from mlecs.model.text import class_text_anchors

            anchors: dict[str, np.ndarray] = {"text.class": class_text_anchors()}
            _cached = encode_tensors(anchors, CodecKind.FP32)
        return _cached
