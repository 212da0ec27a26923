"""The edge model M = {E, C, B} and the named tensors that travel between edge and cloud.

Shared tensor names are normalised and identical on every device:

* ``extractors.<modality>.*`` and ``connector.slots.<modality>.*``: only on devices holding that modality;
* ``connector.core.*``: fusion into z and the soft-token maps;
* ``lora.layer<i>.<query|value>.<A|B>``: the backbone's LoRA matrices;
* ``head.weight`` / ``head.bias``: the classifier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import nn

from mlecs.model.backbone import build_backbone, encode_tokens, hidden_size, lora_parameters
from mlecs.model.config import ModelConfig
from mlecs.model.connector import Connector, FusionCore, SlotProjection
from mlecs.model.extractors import build_extractor
from mlecs.model.seeding import seeded
from mlecs.tensor_names import owning_modality


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    """[N, num_classes] class scores."""
    fused: torch.Tensor
    """[N, fused_dim] the fused representation z (exchanged with the cloud for public samples)."""
    features: Mapping[str, torch.Tensor] = MappingProxyType({})
    """[N, feature_dim] per modality fed: the extractor outputs CCL aligns."""


tensor_modality = owning_modality
"""The modality a shared tensor belongs to (only devices with it hold it), or None if common."""


class EdgeModel(nn.Module):
    """Extractors for the device's modalities, the connector, the LoRA-adapted backbone and a head."""

    def __init__(
        self,
        config: ModelConfig,
        modalities: Iterable[str],
        *,
        seed: int = 0,
        load_pretrained: bool = True,
    ) -> None:
        super().__init__()
        held = frozenset(str(m) for m in modalities)
        if not held:
            raise ValueError("modalities must name at least one modality")
        unknown = sorted(held - set(config.modality_names))
        if unknown:
            raise ValueError(f"the model has no input {', '.join(map(repr, unknown))} "
                             f"(it reads {', '.join(config.modality_names)})")
        self.config = config
        self.modalities: frozenset[str] = held
        ordered = [m for m in config.modality_names if m in held]
        # Each part draws from its own seeded stream: a tensor is identical on every device holding it.
        extractors = {}
        slots = {}
        for modality in ordered:
            with seeded(seed, f"extractors.{modality}"):
                extractors[modality] = build_extractor(config.input_spec(modality), config.feature_dim)
            with seeded(seed, f"connector.slots.{modality}"):
                slots[modality] = SlotProjection(config.feature_dim)
        self.extractors = nn.ModuleDict(extractors)
        self.backbone = build_backbone(config, seed, load_pretrained=load_pretrained)
        width = hidden_size(self.backbone)
        with seeded(seed, "connector.core"):
            core = FusionCore(len(config.modality_names), config.feature_dim, config.fused_dim,
                              config.num_soft_tokens, width)
        self.connector = Connector(config.modality_names, slots, core, config.feature_dim)
        with seeded(seed, "head"):
            self.head = nn.Linear(width + (config.fused_dim if config.fused_skip else 0), config.num_classes)
        self._shared = self._collect_shared()

    def _collect_shared(self) -> dict[str, nn.Parameter]:
        named: dict[str, nn.Parameter] = {}
        for prefix, module in (("extractors", self.extractors), ("connector", self.connector)):
            named.update({f"{prefix}.{n}": p for n, p in module.named_parameters()})
        named.update(lora_parameters(self.backbone))
        named.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        # Guard against a peft/transformers change silently training something that never travels.
        trainable = {id(p) for p in self.parameters() if p.requires_grad}
        if trainable != {id(p) for p in named.values()}:
            raise RuntimeError("trainable parameters and shared tensors disagree; check the LoRA setup")
        return named

    def forward(self, inputs: Mapping[str, torch.Tensor],
                present: Mapping[str, torch.Tensor] | None = None) -> ModelOutput:
        """Classifies a batch from the modalities in ``inputs`` (absent ones are simply missing).

        ``present[m]`` (bool [N]) marks which samples have modality ``m`` when that differs within the batch
        (the input rows of the others are ignored); without it every sample has every modality given.
        """
        if not inputs:
            raise ValueError("inputs must hold at least one modality")
        unknown = set(inputs) - self.modalities
        if unknown:
            raise ValueError(f"model has no extractor for {sorted(str(m) for m in unknown)}")
        sizes = {int(x.shape[0]) for x in inputs.values()}
        if len(sizes) != 1:
            raise ValueError(f"all modalities must have the same batch size, got {sorted(sizes)}")
        features = {str(m): self.extractors[str(m)](x) for m, x in inputs.items()}
        fused, tokens = self.connector(features, present)
        pooled = encode_tokens(self.backbone, tokens)
        # The skip path: z reaches the head directly as well as through the backbone (ModelConfig.fused_skip).
        head_input = torch.cat([pooled, fused], dim=1) if self.config.fused_skip else pooled
        return ModelOutput(logits=self.head(head_input), fused=fused, features=features)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Returns detached fp32 CPU copies of the tensors that travel between edge and cloud."""
        return {name: p.detach().to("cpu", torch.float32).clone() for name, p in self._shared.items()}

    def load_shared_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Overwrites every shared tensor this model holds with the one of the same name in ``tensors``.

        Tensors of modalities this model lacks are ignored; any other unknown name, a missing tensor or
        a shape mismatch raises ValueError (before anything is changed).
        """
        for name in tensors:
            if name in self._shared:
                continue
            modality = tensor_modality(name)
            # Only a tensor of a modality of this federation that this device lacks is skipped.
            if modality is None or modality in self.modalities or modality not in self.config.modality_names:
                raise ValueError(f"unknown shared tensor {name!r}")
        self._copy_into(self._shared, tensors)

    def load_matching_shared_state(self, tensors: Mapping[str, torch.Tensor],
                                   exclude: tuple[str, ...] = ()) -> list[str]:
        """Overwrites the shared tensors that ``tensors`` holds under the same name and shape, except names
        starting with ``exclude``; keeps the rest. Returns the names loaded.

        For a model that differs from the sender's (a cloud model with more backbone layers than the
        devices' adapters cover): it adopts what the two have in common.
        """
        chosen = {name: tensors[name] for name, param in self._shared.items()
                  if name in tensors and not name.startswith(exclude)
                  and tuple(tensors[name].shape) == tuple(param.shape)}
        self._copy_into({name: self._shared[name] for name in chosen}, chosen)
        return sorted(chosen)

    def shared_parameters(self, prefixes: tuple[str, ...] = ()) -> list[nn.Parameter]:
        """The trainable parameters behind :meth:`shared_state`, in the same order; with ``prefixes``,
        only those whose names start with one of them."""
        return [p for name, p in self._shared.items() if not prefixes or name.startswith(prefixes)]

    def personal_state(self) -> dict[str, torch.Tensor]:
        """Returns fp32 CPU copies of all trainable tensors (a personalised model, for ``torch.save``)."""
        return {
            name: p.detach().to("cpu", torch.float32).clone() for name, p in self._shared.items() if p.requires_grad
        }

    def load_personal_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restores :meth:`personal_state`; unknown, missing or mis-shaped tensors raise ValueError."""
        trainable = {name: p for name, p in self._shared.items() if p.requires_grad}
        unknown = sorted(set(tensors) - set(trainable))
        if unknown:
            raise ValueError(f"unknown personal tensor {unknown[0]!r}")
        self._copy_into(trainable, tensors)

    @staticmethod
    def _copy_into(targets: Mapping[str, nn.Parameter], tensors: Mapping[str, torch.Tensor]) -> None:
        for name, param in targets.items():
            if name not in tensors:
                raise ValueError(f"tensor {name!r} is missing")
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise ValueError(f"tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(param.shape)}")
        with torch.no_grad():
            for name, param in targets.items():
                param.copy_(tensors[name])


def build_edge_model(config: ModelConfig, modalities: Iterable[str], seed: int) -> EdgeModel:
    """Creates an edge model whose tensors depend only on (config, seed, tensor name)."""
    return EdgeModel(config, modalities, seed=seed)


@lru_cache(maxsize=16)
def _meta_model_facts(config: ModelConfig) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], int]:
    # Built on the meta device: shapes and counts without allocating or loading any weights.
    with torch.device("meta"):
        model = EdgeModel(config, config.modality_names, load_pretrained=False)
    schema = tuple((name, tuple(p.shape)) for name, p in model._shared.items())
    return schema, sum(p.numel() for p in model.parameters())


def shared_schema(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every shared tensor of a model with all modalities (the federation's schema)."""
    return dict(_meta_model_facts(config)[0])


def full_model_fp32_bytes(config: ModelConfig) -> int:
    """Bytes of all parameters of a full-modality edge model in fp32, frozen backbone included."""
    return 4 * _meta_model_facts(config)[1]
