"""Log-mel features of audio clips; with the default :class:`LogMelSpec`, those of the stored ``fsdd_logmel.npz``.

A task may set its own rate, clip length, window, hop and mel range (``mlecs.tasks.AudioInput``). The defaults
are those of the dataset's ``params`` string: each clip is centre-cropped or zero-padded
to 8192 samples, framed with a periodic Hann window of 256 and hop 128 (the last frame zero-padded at
the end, giving 64 frames), turned into a power spectrum, projected onto 40 HTK-mel triangles between
20 and 4000 Hz, and passed through ``log(x + 1e-6)``. The triangles are area-normalised
(height ``2 / (right - left)`` in Hz, "Slaney" normalisation): the README does not say so, but only this
variant reproduces the stored features. Waveforms are int16 PCM scaled by 1/32768.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 8000
CLIP_SAMPLES = 8192
N_FFT = 256
HOP = 128
N_MELS = 40
FMIN_HZ = 20.0
FMAX_HZ = 4000.0
LOG_OFFSET = 1e-6
NUM_FRAMES = CLIP_SAMPLES // HOP  # 64



@dataclass(frozen=True)
class LogMelSpec:
    """How a clip becomes a log-mel spectrogram; the defaults reproduce AV-MNIST's stored features."""

    sample_rate: int = SAMPLE_RATE
    clip_samples: int = CLIP_SAMPLES
    n_fft: int = N_FFT
    hop: int = HOP
    n_mels: int = N_MELS
    fmin_hz: float = FMIN_HZ
    fmax_hz: float = FMAX_HZ

    @property
    def frames(self) -> int:
        return self.clip_samples // self.hop


AVMNIST_LOGMEL = LogMelSpec()

# Frames per FFT batch: bounds peak memory (a batch of 256 clips is ~16 MiB of float32 frames).
_CLIPS_PER_BATCH = 256


def pcm16_to_float(samples: np.ndarray) -> np.ndarray:
    """Scales int16 PCM samples to float32 in [-1, 1), the unit the stored features were computed in."""
    return np.asarray(samples, dtype=np.float32) / np.float32(32768.0)


def fit_length(clip: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
    """Returns ``clip`` centre-cropped or symmetrically zero-padded to exactly ``length`` samples."""
    size = clip.shape[0]
    if size >= length:
        start = (size - length) // 2
        return clip[start : start + length]
    out = np.zeros(length, dtype=clip.dtype)
    start = (length - size) // 2
    out[start : start + size] = clip
    return out


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(spec: LogMelSpec = AVMNIST_LOGMEL) -> np.ndarray:
    """The [n_mels, n_fft/2 + 1] float64 HTK-mel filterbank (area-normalised triangles) for the power spectrum."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(spec.fmin_hz)), _hz_to_mel(np.array(spec.fmax_hz)),
                                   spec.n_mels + 2))
    bin_hz = np.arange(spec.n_fft // 2 + 1) * spec.sample_rate / spec.n_fft
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bin_hz[None, :] - left) / (centre - left)
    falling = (right - bin_hz[None, :]) / (right - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    weights: np.ndarray = triangles * (2.0 / (right - left))
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=8)
def _hann_window(n_fft: int) -> np.ndarray:
    # Periodic (not symmetric) Hann: the DFT-even window used for spectral analysis.
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    return window.astype(np.float32)


def _frames(clips: np.ndarray, spec: LogMelSpec) -> np.ndarray:
    """Splits [N, clip_samples] clips into [N, frames, n_fft] overlapping frames (zero-padded past the end)."""
    padded = np.pad(clips, ((0, 0), (0, spec.n_fft - spec.hop)))
    starts = np.arange(spec.frames) * spec.hop
    return padded[:, starts[:, None] + np.arange(spec.n_fft)[None, :]]


def logmel_batch(clips: np.ndarray, spec: LogMelSpec = AVMNIST_LOGMEL) -> np.ndarray:
    """Computes float32 [N, n_mels, frames] log-mel features of float clips already fitted to [N, clip_samples]."""
    if clips.ndim != 2 or clips.shape[1] != spec.clip_samples:
        raise ValueError(f"clips must have shape [N, {spec.clip_samples}], got {list(clips.shape)}")
    out = np.empty((clips.shape[0], spec.n_mels, spec.frames), dtype=np.float32)
    weights = mel_filterbank(spec)
    window = _hann_window(spec.n_fft)
    for start in range(0, clips.shape[0], _CLIPS_PER_BATCH):
        chunk = clips[start : start + _CLIPS_PER_BATCH].astype(np.float32)
        spectrum = np.fft.rfft(_frames(chunk, spec) * window, axis=-1)
        power = spectrum.real.astype(np.float64) ** 2 + spectrum.imag.astype(np.float64) ** 2
        mel = np.einsum("mk,nfk->nmf", weights, power)
        out[start : start + chunk.shape[0]] = np.log(mel + LOG_OFFSET)
    return out


def logmel_of_clips(clips: Sequence[np.ndarray], spec: LogMelSpec = AVMNIST_LOGMEL) -> np.ndarray:
    """Computes [N, n_mels, frames] float32 log-mel features of raw float clips of any length (in [-1, 1))."""
    if len(clips) == 0:
        return np.empty((0, spec.n_mels, spec.frames), dtype=np.float32)
    fitted = np.stack([fit_length(np.asarray(clip, dtype=np.float32), spec.clip_samples) for clip in clips])
    return logmel_batch(fitted, spec)
