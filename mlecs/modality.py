"""Modality names: a federation's task names its modalities; AV-MNIST's are ``image`` and ``audio``.

Names are the stable wire/storage spelling (the tensor-name segment ``extractors.<name>.*``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class Modality(StrEnum):
    """AV-MNIST's two modalities (the bundled example and the benchmarks' data)."""

    IMAGE = "image"
    AUDIO = "audio"


def parse_modalities(names: Iterable[str], known: Iterable[str] | None = None) -> frozenset[str]:
    """Turns names such as ``["image", "audio"]`` into a set; raises ValueError naming a bad one.

    ``known``: the modalities the federation's task has (a name outside them is refused); None checks
    the spelling only (lower-case letters, digits and _, starting with a letter, at most 32).
    """
    allowed = None if known is None else frozenset(known)
    result = set()
    for name in names:
        modality = str(name).strip().lower()
        if allowed is not None and modality not in allowed:
            raise ValueError(f"unknown modality {name!r}; this federation's modalities: {', '.join(sorted(allowed))}")
        if not _NAME.match(modality):
            raise ValueError(f"modality {name!r} must be lower-case letters, digits and _ (at most 32)")
        result.add(modality)
    if not result:
        raise ValueError("a device needs at least one modality")
    return frozenset(result)


def modality_key(modalities: Iterable[str]) -> str:
    """A canonical, sorted, comma-joined spelling such as ``audio,image`` (used as a bounded label)."""
    return ",".join(sorted(str(m) for m in modalities))
