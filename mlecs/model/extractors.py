"""E: one small CNN per modality, turning an image or a log-mel spectrogram into a feature vector."""

from __future__ import annotations

import torch
from torch import nn

from mlecs.modality import Modality

# Expected per-sample input shapes ([channels, height, width]); forward checks them to fail early.
INPUT_SHAPES: dict[Modality, tuple[int, int, int]] = {
    Modality.IMAGE: (1, 28, 28),
    Modality.AUDIO: (1, 40, 64),
}

# Fixed (mean, std) applied to the input: MNIST's well-known pixel statistics for [0, 1] images; audio
# arrives already standardised by the loader. Centred inputs make the features differ much more
# between samples at initialisation, which is what lets training start quickly through the backbone.
INPUT_MEAN_STD: dict[Modality, tuple[float, float]] = {
    Modality.IMAGE: (0.1307, 0.3081),
    Modality.AUDIO: (0.0, 1.0),
}

_POOLED = 3  # spatial size after adaptive pooling: keeps the linear layer small for any input size


class ConvExtractor(nn.Module):
    """Two strided 3x3 convolutions (16 and 32 channels), 3x3 max pooling and a linear projection.

    About 23K parameters for ``feature_dim`` 64; used for both images and log-mels, which are both
    single-channel 2-D maps. Max rather than average pooling: averaging large regions washes out
    the differences between samples and made training several times slower to start.
    """

    def __init__(
        self, input_shape: tuple[int, int, int], feature_dim: int, input_mean_std: tuple[float, float]
    ) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.input_mean, self.input_std = input_mean_std
        self.conv1 = nn.Conv2d(input_shape[0], 16, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(_POOLED)
        self.proj = nn.Linear(32 * _POOLED * _POOLED, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected input of shape [N, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}"
            )
        h = torch.relu(self.conv1((x - self.input_mean) / self.input_std))
        h = torch.relu(self.conv2(h))
        return self.proj(self.pool(h).flatten(1))


def build_extractor(modality: Modality, feature_dim: int) -> ConvExtractor:
    """Creates the (randomly initialised) extractor for ``modality``."""
    return ConvExtractor(INPUT_SHAPES[modality], feature_dim, INPUT_MEAN_STD[modality])
