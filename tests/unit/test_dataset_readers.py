"""Each kind's reader turns a real file into the task's shape, and says what is wrong with a bad one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile

from mlecs.data.logmel import LogMelSpec, logmel_of_clips
from mlecs.datasets.readers import InputError, read_input
from mlecs.tasks import AudioInput, ImageInput, SeriesInput, VectorInput

GREY = ImageInput(kind="image", size=(28, 28), channels=1)
RGB = ImageInput(kind="image", size=(16, 24), channels=3)
AUDIO = AudioInput(kind="audio", sample_rate=8000, clip_samples=8192, fmax_hz=4000)
SERIES = SeriesInput(kind="series", channels=3, length=50)
VECTOR = VectorInput(kind="vector", dim=5)


def test_greyscale_png_is_scaled_to_unit_range(tmp_path: Path) -> None:
    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    Image.fromarray(pixels, mode="L").save(tmp_path / "a.png")
    out = read_input(tmp_path / "a.png", GREY)
    assert out.shape == (1, 28, 28) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], pixels / 255.0, atol=1e-7)


def test_colour_jpeg_is_resized_and_converted(tmp_path: Path) -> None:
    Image.new("RGB", (100, 60), (255, 0, 0)).save(tmp_path / "b.jpg")
    rgb = read_input(tmp_path / "b.jpg", RGB)
    assert rgb.shape == (3, 16, 24)
    assert rgb[0].mean() > 0.95 and rgb[1].mean() < 0.05
    grey = read_input(tmp_path / "b.jpg", GREY)  # colour to greyscale: one channel, red's luminance
    assert grey.shape == (1, 28, 28) and 0.25 < grey.mean() < 0.35


@pytest.mark.parametrize(("name", "content", "message"), [
    ("c.png", b"not an image", "unreadable image"),
    ("c.gif", b"GIF89a", "must end in .png or .jpg or .jpeg"),
    ("c.wav", b"RIFF\x00\x00", "unreadable WAV"),
    ("c.csv", b"1,2,3\n4,5\n", "different numbers of columns"),
    ("c.csv", b"a,b,c\n1,2,x\n", "not a number"),
    ("c.npy", b"\x93NUMPY garbage", "unreadable .npy"),
])
def test_corrupt_files_are_refused_with_the_reason(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    spec = {".png": GREY, ".gif": GREY, ".wav": AUDIO, ".csv": SERIES, ".npy": VECTOR}[Path(name).suffix]
    with pytest.raises(InputError, match=message):
        read_input(tmp_path / name, spec)


def test_a_missing_file_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_input(tmp_path / "absent.png", GREY)


def _tone(rate: int, seconds: float = 0.8) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t)).astype(np.float32)


def test_audio_at_any_rate_and_layout_gives_the_same_log_mel(tmp_path: Path) -> None:
    expected = logmel_of_clips([_tone(8000)])[0]
    wavfile.write(tmp_path / "native.wav", 8000, np.round(_tone(8000) * 32767).astype(np.int16))
    stereo = np.stack([_tone(16000), _tone(16000)], axis=1)
    wavfile.write(tmp_path / "stereo16k.wav", 16000, stereo)  # float32, two channels, twice the rate
    native = read_input(tmp_path / "native.wav", AUDIO)
    resampled = read_input(tmp_path / "stereo16k.wav", AUDIO)
    assert native.shape == resampled.shape == (1, 40, 64)
    np.testing.assert_allclose(native[0], expected, atol=0.02)  # 16-bit quantisation
    # Resampling filters the band edge; where the tones are, the spectra agree closely.
    loud = expected > expected.max() - 10
    assert np.abs(resampled[0][loud] - expected[loud]).max() < 0.5


def test_audio_spec_of_another_task_sets_the_feature_shape(tmp_path: Path) -> None:
    spec = AudioInput(kind="audio", sample_rate=16000, clip_samples=16000, n_fft=512, hop=256, n_mels=32,
                      fmax_hz=8000)
    wavfile.write(tmp_path / "a.wav", 16000, _tone(16000))
    out = read_input(tmp_path / "a.wav", spec)
    assert out.shape == (1, 32, 62)
    mel = LogMelSpec(sample_rate=16000, clip_samples=16000, n_fft=512, hop=256, n_mels=32, fmax_hz=8000)
    np.testing.assert_allclose(out[0], logmel_of_clips([_tone(16000)], mel)[0], atol=1e-4)


def test_empty_wav_is_refused(tmp_path: Path) -> None:
    wavfile.write(tmp_path / "empty.wav", 8000, np.zeros(0, dtype=np.int16))
    with pytest.raises(InputError, match="no samples"):
        read_input(tmp_path / "empty.wav", AUDIO)


def test_series_from_csv_with_header_and_from_npy(tmp_path: Path) -> None:
    values = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    (tmp_path / "s.csv").write_text("x,y,z\n" + "\n".join(",".join(str(v) for v in row) for row in values))
    np.save(tmp_path / "s.npy", values)
    from_csv = read_input(tmp_path / "s.csv", SERIES)
    np.testing.assert_array_equal(from_csv, read_input(tmp_path / "s.npy", SERIES))
    assert from_csv.shape == (3, 50)
    np.testing.assert_array_equal(from_csv[:, 5:45], values.T)  # 40 steps centred in 50, zeros around
    assert not from_csv[:, :5].any()


def test_series_with_the_wrong_channel_count_or_nan_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "two.npy", np.zeros((10, 2)))
    with pytest.raises(InputError, match="2 channel\\(s\\), the task wants 3"):
        read_input(tmp_path / "two.npy", SERIES)
    np.save(tmp_path / "nan.npy", np.full((10, 3), np.nan))
    with pytest.raises(InputError, match="non-finite"):
        read_input(tmp_path / "nan.npy", SERIES)


def test_vectors_must_have_the_task_dimension(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.arange(5, dtype=np.int64))
    np.testing.assert_array_equal(read_input(tmp_path / "v.npy", VECTOR), np.arange(5, dtype=np.float32))
    np.save(tmp_path / "w.npy", np.zeros(6))
    with pytest.raises(InputError, match=r"shape \[6\], the task wants \[5\]"):
        read_input(tmp_path / "w.npy", VECTOR)
    np.save(tmp_path / "o.npy", np.array(["a", "b"]))
    with pytest.raises(InputError, match="numeric"):
        read_input(tmp_path / "o.npy", VECTOR)
