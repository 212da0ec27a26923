"""Reading one sample's file of one modality into the array its task declares.

Each reader returns float32 in the modality's stored shape (``spec.shape``) or raises :class:`InputError`
saying what is wrong with the file; the task's ``mean``/``std`` are applied later, by the extractor.
"""

from __future__ import annotations

import csv
import struct
import warnings
from collections.abc import Callable
from math import gcd
from pathlib import Path

import numpy as np

from mlecs.data.logmel import LogMelSpec, fit_length, logmel_batch
from mlecs.tasks.spec import AudioInput, ImageInput, ModalitySpec, SeriesInput, VectorInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AUDIO_SUFFIXES = (".wav",)
SERIES_SUFFIXES = (".csv", ".npy")
VECTOR_SUFFIXES = (".npy",)
_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a larger "image" is a decompression bomb, not a sensor frame


class InputError(ValueError):
    """A sample's file cannot be used for its modality; the message says why."""


def _check_suffix(path: Path, allowed: tuple[str, ...], kind: str) -> None:
    if path.suffix.lower() not in allowed:
        raise InputError(f"a {kind} file must end in {' or '.join(allowed)}, not {path.suffix or '(no suffix)'!r}")


def read_image(path: Path, spec: ImageInput) -> np.ndarray:
    """PNG/JPEG -> [channels, height, width] in [0, 1], resized (bilinear) when its size differs."""
    from PIL import Image

    _check_suffix(path, IMAGE_SUFFIXES, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > _MAX_IMAGE_PIXELS:
                    raise InputError(f"image is {image.width}x{image.height}, larger than any sensor frame")
                image.load()
                converted = image.convert("L" if spec.channels == 1 else "RGB")
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InputError(f"unreadable image: {exc}") from None
    height, width = spec.size
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted, dtype=np.float32) / np.float32(255.0)
    return pixels[None] if spec.channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _wav_to_float(samples: np.ndarray) -> np.ndarray:
    """Any WAV sample type -> float32 in [-1, 1), mixed down to mono."""
    if samples.dtype == np.uint8:
        values = (samples.astype(np.float32) - 128.0) / 128.0
    elif samples.dtype == np.int16:
        values = samples.astype(np.float32) / 32768.0
    elif samples.dtype == np.int32:
        values = (samples.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif samples.dtype in (np.float32, np.float64):
        values = samples.astype(np.float32)
    else:
        raise InputError(f"unsupported WAV sample type {samples.dtype}")
    return values.mean(axis=1) if values.ndim == 2 else values


def read_audio_clip(path: Path, sample_rate: int) -> np.ndarray:
    """A WAV file as mono float32 at ``sample_rate`` (resampled with a polyphase filter when needed)."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    _check_suffix(path, AUDIO_SUFFIXES, "audio")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)  # unknown chunks are fine
            rate, samples = wavfile.read(path)
    except (OSError, ValueError, struct.error) as exc:  # struct.error: a truncated header
        raise InputError(f"unreadable WAV file: {exc}") from None
    clip = _wav_to_float(np.asarray(samples))
    if clip.size == 0:
        raise InputError("the WAV file holds no samples")
    if not np.isfinite(clip).all():
        raise InputError("the WAV file holds non-finite samples")
    if rate != sample_rate:
        common = gcd(int(rate), sample_rate)
        clip = resample_poly(clip, sample_rate // common, int(rate) // common).astype(np.float32)
    return clip


def audio_spec(spec: AudioInput) -> LogMelSpec:
    return LogMelSpec(sample_rate=spec.sample_rate, clip_samples=spec.clip_samples, n_fft=spec.n_fft, hop=spec.hop,
                      n_mels=spec.n_mels, fmin_hz=spec.fmin_hz, fmax_hz=spec.fmax_hz)


def read_audio(path: Path, spec: AudioInput) -> np.ndarray:
    """WAV -> [1, n_mels, frames] log-mel, computed on the device from the clip at the task's rate."""
    clip = fit_length(read_audio_clip(path, spec.sample_rate), spec.clip_samples)
    return logmel_batch(clip[None], audio_spec(spec))


def _read_csv_series(path: Path) -> np.ndarray:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"unreadable CSV file: {exc}") from None
    if rows:
        try:
            [float(cell) for cell in rows[0]]
        except ValueError:
            rows = rows[1:]  # a header row of channel names
    if not rows:
        raise InputError("the CSV file holds no rows of values")
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        raise InputError(f"the CSV rows have different numbers of columns ({sorted(widths)})")
    try:
        return np.asarray([[float(cell) for cell in row] for row in rows], dtype=np.float32)
    except ValueError as exc:
        raise InputError(f"the CSV file holds a value that is not a number: {exc}") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable .npy file: {exc}") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
        raise InputError("the .npy file does not hold a numeric array")
    return array.astype(np.float32)


def read_series(path: Path, spec: SeriesInput) -> np.ndarray:
    """CSV (rows = time steps) or .npy [steps, channels] -> [channels, length], centre-cropped or zero-padded."""
    _check_suffix(path, SERIES_SUFFIXES, "series")
    values = _read_csv_series(path) if path.suffix.lower() == ".csv" else _read_npy(path)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise InputError(f"a series must be [steps, channels], got shape {list(values.shape)}")
    if values.shape[1] != spec.channels:
        raise InputError(f"the series has {values.shape[1]} channel(s), the task wants {spec.channels}")
    if not np.isfinite(values).all():
        raise InputError("the series holds non-finite values")
    return np.stack([fit_length(values[:, c], spec.length) for c in range(spec.channels)])


def read_vector(path: Path, spec: VectorInput) -> np.ndarray:
    """.npy of shape [dim] (or [1, dim]) -> [dim]."""
    _check_suffix(path, VECTOR_SUFFIXES, "vector")
    values = _read_npy(path)
    if values.ndim == 2 and values.shape[0] == 1:
        values = values[0]
    if values.shape != (spec.dim,):
        raise InputError(f"the vector has shape {list(values.shape)}, the task wants [{spec.dim}]")
    if not np.isfinite(values).all():
        raise InputError("the vector holds non-finite values")
    return values


_READERS: dict[str, Callable[[Path, ModalitySpec], np.ndarray]] = {
    "image": read_image,  # type: ignore[dict-item]
    "audio": read_audio,  # type: ignore[dict-item]
    "series": read_series,  # type: ignore[dict-item]
    "vector": read_vector,  # type: ignore[dict-item]
}


def read_input(path: Path, spec: ModalitySpec) -> np.ndarray:
    """Reads ``path`` as a sample of a modality declared by ``spec``; raises InputError when it cannot."""
    if not path.is_file():
        raise InputError("file not found")
    return _READERS[spec.kind](path, spec)
