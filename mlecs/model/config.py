"""The hyper-parameters of the edge model M = {E, C, B}; plain data, importable without torch."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from typing import Any, Literal, get_args

Backbone = Literal["minilm", "tiny"]
BACKBONES: tuple[str, ...] = get_args(Backbone)

InputKind = Literal["image", "audio", "series", "vector"]
INPUT_KINDS: tuple[str, ...] = get_args(InputKind)
_RANK_OF_KIND = {"image": 3, "audio": 3, "series": 2, "vector": 1}  # [C, H, W], [1, mels, frames], [C, L], [D]
_MODALITY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_MAX_INPUTS = 16
EXTRACTOR_ENTRY_POINTS = "mlecs.extractors"
"""Entry-point group through which a package registers extractors an input may name (``extractor = "..."``)."""


def registered_extractors() -> dict[str, metadata.EntryPoint]:
    """Extractors installed packages register under the ``mlecs.extractors`` entry-point group."""
    return {ep.name: ep for ep in metadata.entry_points(group=EXTRACTOR_ENTRY_POINTS)}
_MAX_INPUT_VALUES = 1 << 22


@dataclass(frozen=True)
class InputSpec:
    """One modality the model reads: its name (the tensor-name segment), kind, per-sample shape and the
    standardisation its extractor applies; ``extractor`` names a registered custom one (else ``builtin``)."""

    name: str
    kind: InputKind
    shape: tuple[int, ...]
    mean: float = 0.0
    std: float = 1.0
    extractor: str = "builtin"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _MODALITY_NAME.match(self.name):
            raise ValueError(f"input name {self.name!r} must be lower-case letters, digits and _ (at most 32)")
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input {self.name!r}: kind must be one of {', '.join(INPUT_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "shape", tuple(self.shape))
        if len(self.shape) != _RANK_OF_KIND[self.kind] or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.shape):
            raise ValueError(f"input {self.name!r}: a {self.kind} input needs {_RANK_OF_KIND[self.kind]} positive "
                             f"sizes, got {list(self.shape)}")
        if math.prod(self.shape) > _MAX_INPUT_VALUES:
            raise ValueError(f"input {self.name!r}: {math.prod(self.shape):,} values per sample, at most "
                             f"{_MAX_INPUT_VALUES:,}")
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"input {self.name!r}: mean must be finite and std finite and > 0")


AVMNIST_INPUTS: tuple[InputSpec, ...] = (
    # Images arrive as [0, 1] pixels and are centred with MNIST's statistics; the AV-MNIST loader
    # already standardises audio log-mels, so the extractor leaves them as they are.
    InputSpec("audio", "audio", (1, 40, 64)),
    InputSpec("image", "image", (1, 28, 28), mean=0.1307, std=0.3081),
)

# A federation's model is built by the coordinator and every device from an admin request: bounded, so a
# typo or a hostile request cannot ask for a model that exhausts memory. Far above any edge model here.
_UPPER_BOUNDS = {"feature_dim": 16384, "fused_dim": 65536, "num_soft_tokens": 64, "lora_rank": 256,
                 "lora_alpha": 4096}
_MAX_CLASSES = 10_000
_MAX_BACKBONE_LAYERS = 64


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the extractors, connector, backbone adapter and head; identical across a federation."""

    feature_dim: int = 64
    """Width of each extractor's output and of each modality's connector slot."""
    fused_dim: int = 256
    """Width of the fused representation z."""
    num_soft_tokens: int = 4
    """Soft-prompt tokens made from z; must divide ``fused_dim``."""
    backbone: Backbone = "minilm"
    """``minilm``: pretrained all-MiniLM-L6-v2; ``tiny``: a random 2-layer BERT (hidden 64) for fast tests."""
    backbone_layers: int = 0
    """Keep only the first this many transformer layers of the backbone (0: all of them). A device can run
    the first layers of MiniLM while the cloud runs all six: anchors live in the fused space, so the two
    need not match."""
    fused_skip: bool = True
    """The head reads the fused ``z`` beside the backbone's pooled output. Without this path everything
    the head sees must pass through the frozen backbone, and with pretrained MiniLM training stalls at
    chance for epochs (docs/method.md)."""
    lora_rank: int = 4
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    num_classes: int = 10
    inputs: tuple[InputSpec, ...] = field(default=AVMNIST_INPUTS)
    """The modalities the model reads (from the federation's task); default: AV-MNIST's image and audio."""

    def __post_init__(self) -> None:
        for name, most in _UPPER_BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"{name} must be an integer from 1 to {most}, got {value!r}")
        if self.fused_dim % self.num_soft_tokens:
            raise ValueError(
                f"fused_dim ({self.fused_dim}) must be divisible by num_soft_tokens ({self.num_soft_tokens})"
            )
        layers = self.backbone_layers
        if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= _MAX_BACKBONE_LAYERS:
            raise ValueError(f"backbone_layers must be an integer from 0 (all) to {_MAX_BACKBONE_LAYERS}, "
                             f"got {layers!r}")
        if not isinstance(self.fused_skip, bool):
            raise ValueError(f"fused_skip must be true or false, got {self.fused_skip!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self._check_inputs()
        classes = self.num_classes
        if not isinstance(classes, int) or isinstance(classes, bool) or not 2 <= classes <= _MAX_CLASSES:
            raise ValueError(f"num_classes must be an integer from 2 to {_MAX_CLASSES}, got {self.num_classes!r}")

    def _check_inputs(self) -> None:
        inputs = self.inputs
        if not isinstance(inputs, tuple) or not all(isinstance(spec, InputSpec) for spec in inputs):
            raise ValueError("inputs must be a tuple of InputSpec (ModelConfig.from_dict converts dicts)")
        names = [spec.name for spec in inputs]
        if not 1 <= len(names) <= _MAX_INPUTS:
            raise ValueError(f"inputs must list from 1 to {_MAX_INPUTS} modalities, got {len(names)}")
        if names != sorted(set(names)):
            raise ValueError(f"inputs must be sorted by name without repeats, got {names}")

    @property
    def modality_names(self) -> tuple[str, ...]:
        """The inputs' names in slot order (sorted): the same on every device of a federation."""
        return tuple(spec.name for spec in self.inputs)

    def input_spec(self, name: str) -> InputSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise ValueError(f"the model has no input {name!r} (it reads {', '.join(self.modality_names)})")

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-ready dict (the inverse of :meth:`from_dict`)."""
        data = asdict(self)
        data["inputs"] = [{**asdict(spec), "shape": list(spec.shape)} for spec in self.inputs]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Builds a config from a dict; missing keys take defaults, unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)}")
        values = dict(data)
        if "inputs" in values:
            values["inputs"] = _inputs_from(values["inputs"])
        return cls(**values)


def _inputs_from(raw: Any) -> tuple[InputSpec, ...]:
    if not isinstance(raw, list | tuple):
        raise ValueError("inputs must be a list of {name, kind, shape, ...} objects")
    specs = []
    for item in raw:
        if isinstance(item, InputSpec):
            specs.append(item)
            continue
        if not isinstance(item, dict):
            raise ValueError(f"inputs: each entry must be an object, got {item!r}")
        unknown = sorted(set(item) - {f.name for f in fields(InputSpec)})
        if unknown:
            raise ValueError(f"inputs: unknown key(s) {', '.join(unknown)}")
        try:
            specs.append(InputSpec(**{**item, "shape": tuple(item.get("shape", ()))}))
        except TypeError as exc:
            raise ValueError(f"inputs: {exc}") from None
    return tuple(specs)
