"""The names of the tensors devices and the coordinator exchange, and which modality owns which.

Torch-free and dependency-free: the agent, the coordinator, the simulated devices of the benchmarks and the
fault tests read them from here, so a renamed tensor cannot leave one of them behind.

An update holds the shared tensors of the edge model (``lora.*`` adapters, ``extractors.<modality>.*``,
``connector.slots.<modality>.*``, the common fusion parts) as deltas, plus ``fused.z`` when the device sends
the fused representation of some public samples. An anchor set holds ``text.class`` and the cloud's
``fused.z`` rows for the public samples named by ``fused.ids``.
"""

from __future__ import annotations

FUSED_TENSOR = "fused.z"
"""In an update: the device's fused z of a few public samples (rows: the header's ``fused_sample_ids``)."""
SAMPLE_ANCHORS = "fused.z"
"""In an anchor set: the cloud's fused z of public samples (rows: ``SAMPLE_ANCHOR_IDS``)."""
SAMPLE_ANCHOR_IDS = "fused.ids"
TEXT_ANCHORS = "text.class"
"""In an anchor set: one fused-space anchor per class, from the label descriptions."""
LORA_PREFIX = "lora."
"""LoRA factors: ``lora.<layer>.<target>.A`` [r, in] and ``.B`` [out, r]."""
MODALITY_PREFIXES = ("extractors.", "connector.slots.")
"""Tensors only devices with the modality hold: ``<prefix><modality>.<rest>``."""


def owning_modality(name: str) -> str | None:
    """The modality whose devices alone hold this tensor (an extractor or a connector slot), else None."""
    for prefix in MODALITY_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):].split(".", 1)[0]
    return None


def device_may_send(name: str, modalities: frozenset[str] | set[str]) -> bool:
    """Whether a device with these modalities holds this shared tensor (the coordinator refuses the others)."""
    owner = owning_modality(name)
    return owner is None or owner in modalities
