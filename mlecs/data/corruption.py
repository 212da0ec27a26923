"""The "hard" AV-MNIST corruptions: noisy, half-erased images and audio buried in white noise (0 dB SNR).

Noise for a sample is drawn from a generator seeded by ``(HARD_NOISE_SEED, sample_id, stream)``, so a
sample is corrupted identically whichever subset of the data is loaded and in whatever order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HARD_NOISE_SEED = 20251126
IMAGE_NOISE_SIGMA = 0.6
IMAGE_ERASED_FRACTION = 0.5
AUDIO_SNR_DB = 0.0

# Independent streams per modality, so changing one corruption never shifts the other's noise.
_IMAGE_STREAM = 0
_AUDIO_STREAM = 1


def _rng(sample_id: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([HARD_NOISE_SEED, int(sample_id), stream])


def corrupt_images(images: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """Returns [N, 28, 28] images in [0, 1] with Gaussian noise (sigma 0.6) and 50% of pixels set to zero.

    The noisy image is clipped back to [0, 1] so that it stays a valid image; exactly half of the
    pixels of every image (chosen at random) are then erased.
    """
    if images.shape[0] != sample_ids.shape[0]:
        raise ValueError("images and sample_ids must have the same length")
    out = np.empty_like(images, dtype=np.float32)
    pixels = int(np.prod(images.shape[1:]))
    erased = round(IMAGE_ERASED_FRACTION * pixels)
    for row, sample_id in enumerate(sample_ids):
        rng = _rng(sample_id, _IMAGE_STREAM)
        noisy = images[row] + rng.normal(0.0, IMAGE_NOISE_SIGMA, size=images.shape[1:])
        flat = np.clip(noisy, 0.0, 1.0).astype(np.float32).reshape(-1)
        flat[rng.permutation(pixels)[:erased]] = 0.0
        out[row] = flat.reshape(images.shape[1:])
    return out


def add_white_noise(clips: Sequence[np.ndarray], sample_ids: np.ndarray) -> list[np.ndarray]:
    """Returns float32 clips mixed with white Gaussian noise at 0 dB SNR (noise power = clip power)."""
    if len(clips) != sample_ids.shape[0]:
        raise ValueError("clips and sample_ids must have the same length")
    noise_gain = 10.0 ** (-AUDIO_SNR_DB / 20.0)
    out = []
    for clip, sample_id in zip(clips, sample_ids, strict=True):
        signal = np.asarray(clip, dtype=np.float64)
        rms = float(np.sqrt(np.mean(signal**2))) if signal.size else 0.0
        noise = _rng(sample_id, _AUDIO_STREAM).standard_normal(signal.shape[0])
        out.append((signal + noise_gain * rms * noise).astype(np.float32))
    return out
