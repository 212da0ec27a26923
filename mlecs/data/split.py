"""What training and evaluation need of a set of labelled samples, whatever it was read from.

Two kinds implement it: :class:`mlecs.data.avmnist.AVMnistSplit` (the bundled AV-MNIST arrays, every sample
with both modalities) and :class:`mlecs.datasets.MultimodalData` (a dataset directory, samples missing
modalities one by one).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Protocol, Self

import numpy as np

_INTEGER = re.compile(r"^\d{1,10}$")
_HASHED_BIT = 1 << 31
"""The wire carries public sample ids as uint32: integer ids below 2^31 travel as themselves, any other id
as a 31-bit hash with this bit set, so the two never collide (hashes may, rarely: datasets refuse that)."""


class LabelledSplit(Protocol):
    @property
    def labels(self) -> np.ndarray:
        """int64 [N] class indices."""
        ...

    @property
    def sample_ids(self) -> np.ndarray:
        """int64 [N] stable ids: the same sample has the same id on every device and on the coordinator."""
        ...

    def __len__(self) -> int: ...

    def subset(self, index: np.ndarray) -> Self: ...

    def input_arrays(self) -> Mapping[str, np.ndarray]:
        """Modality -> float32 [N, *shape]."""
        ...

    def presence(self) -> Mapping[str, np.ndarray]:
        """Modality -> bool [N], for the modalities some samples lack; absent key: every sample has it."""
        ...

    @classmethod
    def concatenate(cls, parts: Sequence[Self]) -> Self: ...


def numeric_sample_id(sample_id: str) -> int:
    """A dataset's text id as the number the wire carries (uint32): integers below 2^31 as themselves,
    anything else as a 31-bit hash with the top bit set."""
    text = sample_id.strip()
    if _INTEGER.match(text) and int(text) < _HASHED_BIT:
        return int(text)
    digest = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest(), "big")
    return (digest & (_HASHED_BIT - 1)) | _HASHED_BIT


def numeric_sample_ids(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.asarray([numeric_sample_id(str(i)) for i in ids], dtype=np.int64)
