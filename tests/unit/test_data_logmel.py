"""The numpy log-mel reproduces the dataset's stored features."""

from __future__ import annotations

import numpy as np
import pytest

from mlecs.data.avmnist import default_data_dir
from mlecs.data.logmel import CLIP_SAMPLES, fit_length, logmel_batch, logmel_of_clips, mel_filterbank, pcm16_to_float

# Stored features are float16: around |x| in [8, 16) their spacing is 2**-7, so half of it is the
# rounding error to expect, plus a little float32 arithmetic slack.
FLOAT16_TOLERANCE = 2.0**-8 + 1e-4


@pytest.fixture(scope="module")
def fsdd() -> dict[str, np.ndarray]:
    root = default_data_dir()
    with np.load(root / "fsdd_audio.npz") as audio, np.load(root / "fsdd_logmel.npz") as stored:
        return {"audio": audio["audio"], "offsets": audio["offsets"], "logmel": stored["logmel"]}


def test_logmel_reproduces_stored_features_of_short_and_long_clips(fsdd: dict[str, np.ndarray]) -> None:
    offsets = fsdd["offsets"]
    lengths = np.diff(offsets)
    # The shortest and longest clips exercise both padding and cropping; a few others for breadth.
    picks = [int(np.argmin(lengths)), int(np.argmax(lengths)), 0, 1234, 2999]
    clips = [pcm16_to_float(fsdd["audio"][offsets[i] : offsets[i + 1]]) for i in picks]

    features = logmel_of_clips(clips)

    assert features.shape == (len(picks), 40, 64)
    assert features.dtype == np.float32
    np.testing.assert_allclose(features, fsdd["logmel"][picks].astype(np.float32), atol=FLOAT16_TOLERANCE, rtol=0)


def test_fit_length_centre_crops_long_clips_and_centre_pads_short_ones() -> None:
    long_clip = np.arange(CLIP_SAMPLES + 10, dtype=np.float32)
    short_clip = np.ones(4, dtype=np.float32)

    cropped = fit_length(long_clip)
    padded = fit_length(short_clip, length=10)

    assert cropped.shape == (CLIP_SAMPLES,) and cropped[0] == 5
    np.testing.assert_array_equal(padded, [0, 0, 0, 1, 1, 1, 1, 0, 0, 0])


def test_silence_gives_the_log_floor_everywhere() -> None:
    features = logmel_batch(np.zeros((2, CLIP_SAMPLES), dtype=np.float32))

    np.testing.assert_allclose(features, np.log(1e-6), rtol=1e-6)


def test_mel_filterbank_has_forty_triangles_over_the_fft_bins() -> None:
    weights = mel_filterbank()

    assert weights.shape == (40, 129)
    assert (weights >= 0).all() and (weights.sum(axis=1) > 0).all()


def test_logmel_batch_rejects_clips_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="clips must have shape"):
        logmel_batch(np.zeros((1, 100), dtype=np.float32))
