"""The hyper-parameters of the edge model M = {E, C, B}; plain data, importable without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

Backbone = Literal["minilm", "tiny"]
BACKBONES: tuple[str, ...] = get_args(Backbone)

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
        classes = self.num_classes
        if not isinstance(classes, int) or isinstance(classes, bool) or not 2 <= classes <= _MAX_CLASSES:
            raise ValueError(f"num_classes must be an integer from 2 to {_MAX_CLASSES}, got {self.num_classes!r}")

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-ready dict (the inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Builds a config from a dict; missing keys take defaults, unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)}")
        return cls(**data)
