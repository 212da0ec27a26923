"""E: one small network per modality, turning that modality's input into a feature vector.

The kind of input decides the network: 2-D maps (images, log-mel spectrograms) get a small CNN, time
series a 1-D CNN, feature vectors an MLP. A task may name a custom extractor a package registers under
the ``mlecs.extractors`` entry points instead: a callable ``(spec: InputSpec, feature_dim: int) -> nn.Module``
whose module maps ``[N, *spec.shape]`` to ``[N, feature_dim]``.
"""

from __future__ import annotations

import torch
from torch import nn

from mlecs.model.config import EXTRACTOR_ENTRY_POINTS, InputSpec, registered_extractors

_POOLED = 3  # spatial size after adaptive pooling: keeps the linear layer small for any input size
_SERIES_POOLED = 8


class _Standardised(nn.Module):
    """Checks the per-sample shape (to fail early with a clear message) and applies ``(x - mean) / std``."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.input_shape = spec.shape
        self.input_mean, self.input_std = spec.mean, spec.std

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected input of shape [N, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}"
            )
        return (x - self.input_mean) / self.input_std


class ConvExtractor(_Standardised):
    """Two strided 3x3 convolutions (16 and 32 channels), 3x3 max pooling and a linear projection.

    About 23K parameters for ``feature_dim`` 64; used for images and log-mels, both 2-D maps. Max rather
    than average pooling: averaging large regions washes out the differences between samples and made
    training several times slower to start.
    """

    def __init__(self, spec: InputSpec, feature_dim: int) -> None:
        super().__init__(spec)
        self.conv1 = nn.Conv2d(spec.shape[0], 16, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(_POOLED)
        self.proj = nn.Linear(32 * _POOLED * _POOLED, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(self.standardise(x)))
        h = torch.relu(self.conv2(h))
        return self.proj(self.pool(h).flatten(1))


class SeriesExtractor(_Standardised):
    """Two strided 1-D convolutions (kernel 5) over time, max pooling to 8 steps, a linear projection."""

    def __init__(self, spec: InputSpec, feature_dim: int) -> None:
        super().__init__(spec)
        self.conv1 = nn.Conv1d(spec.shape[0], 32, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(32, 32, kernel_size=5, stride=2, padding=2)
        self.pool = nn.AdaptiveMaxPool1d(_SERIES_POOLED)
        self.proj = nn.Linear(32 * _SERIES_POOLED, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(self.standardise(x)))
        h = torch.relu(self.conv2(h))
        return self.proj(self.pool(h).flatten(1))


class VectorExtractor(_Standardised):
    """A two-layer MLP (hidden width ``2 * feature_dim``)."""

    def __init__(self, spec: InputSpec, feature_dim: int) -> None:
        super().__init__(spec)
        self.net = nn.Sequential(nn.Linear(spec.shape[0], 2 * feature_dim), nn.ReLU(),
                                 nn.Linear(2 * feature_dim, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardise(x))


_BUILTIN = {"image": ConvExtractor, "audio": ConvExtractor, "series": SeriesExtractor, "vector": VectorExtractor}


def build_extractor(spec: InputSpec, feature_dim: int) -> nn.Module:
    """Creates the (randomly initialised) extractor of one input: its kind's own, or the registered one named."""
    if spec.extractor == "builtin":
        return _BUILTIN[spec.kind](spec, feature_dim)
    registered = registered_extractors()
    if spec.extractor not in registered:
        raise ValueError(f"input {spec.name!r} names extractor {spec.extractor!r}, which no installed package "
                         f"registers under the {EXTRACTOR_ENTRY_POINTS!r} entry points")
    module = registered[spec.extractor].load()(spec, feature_dim)
    if not isinstance(module, nn.Module):
        raise TypeError(f"extractor {spec.extractor!r} returned {type(module).__name__}, not a torch module")
    return module
