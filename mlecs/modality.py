"""The modalities a device can hold. Names are the stable wire/storage spelling."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Modality(StrEnum):
    IMAGE = "image"
    AUDIO = "audio"


def parse_modalities(names: Iterable[str]) -> frozenset[Modality]:
    """Turns names such as ``["image", "audio"]`` into modalities; raises ValueError naming a bad one."""
    result = set()
    for name in names:
        try:
            result.add(Modality(name.strip().lower()))
        except ValueError:
            known = ", ".join(m.value for m in Modality)
            raise ValueError(f"unknown modality {name!r}; known modalities: {known}") from None
    if not result:
        raise ValueError("a device needs at least one modality")
    return frozenset(result)


def modality_key(modalities: Iterable[Modality | str]) -> str:
    """A canonical, sorted, comma-joined spelling such as ``audio,image`` (used as a bounded label)."""
    return ",".join(sorted(str(m) for m in modalities))
