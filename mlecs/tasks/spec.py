"""The task file: modalities with their kind and input spec, the label names, the model's sizes.

Parsed with pydantic so that every mistake comes back as one message naming the field, e.g.
``modalities.audio.sample_rate: Input should be greater than or equal to 1000``.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlecs.model.config import EXTRACTOR_ENTRY_POINTS, INPUT_KINDS, InputSpec, ModelConfig, registered_extractors

KINDS: tuple[str, ...] = INPUT_KINDS

RESERVED_COLUMNS = frozenset({"id", "label", "split"})
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_MAX_LABELS = 10_000
_MAX_INPUT_VALUES = 1 << 22  # 4 Mi values per sample per modality: far above any edge input, bounds memory


class TaskError(ValueError):
    """The task file cannot be read or does not describe a usable task; the message says what to fix."""


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    extractor: str = "builtin"
    """``builtin``: the kind's own small network; any other name: an extractor registered by a package
    under the ``mlecs.extractors`` entry-point group."""
    mean: float = 0.0
    """Subtracted from every input value (after the kind's own preprocessing)."""
    std: float = Field(1.0, gt=0)
    """Divides every input value after ``mean`` is subtracted."""

    @field_validator("extractor")
    @classmethod
    def _extractor_is_registered(cls, value: str) -> str:
        if value != "builtin" and value not in registered_extractors():
            known = ", ".join(sorted(registered_extractors())) or "none installed"
            raise ValueError(f"no extractor {value!r} is registered under the {EXTRACTOR_ENTRY_POINTS!r} "
                             f"entry points ({known}); install the package that provides it")
        return value


class ImageInput(_Input):
    """PNG or JPEG files, resized to ``size`` and scaled to [0, 1]; stored [channels, height, width]."""

    kind: Literal["image"]
    size: tuple[Annotated[int, Field(ge=4, le=1024)], Annotated[int, Field(ge=4, le=1024)]]
    """[height, width] every image is resized to."""
    channels: Literal[1, 3] = 1
    """1: greyscale (colour images are converted); 3: RGB."""

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, *self.size)


class AudioInput(_Input):
    """WAV files at any rate, mixed to mono, resampled to ``sample_rate``, centre-cropped or zero-padded to
    ``clip_samples`` and turned into a log-mel spectrogram on the device; stored [1, n_mels, frames]."""

    kind: Literal["audio"]
    sample_rate: int = Field(ge=1000, le=192_000)
    clip_samples: int = Field(ge=64, le=1 << 22)
    n_fft: int = Field(256, ge=16, le=16384)
    hop: int = Field(128, ge=1, le=16384)
    n_mels: int = Field(40, ge=1, le=512)
    fmin_hz: float = Field(20.0, ge=0)
    fmax_hz: float = Field(gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> AudioInput:
        if self.fmax_hz > self.sample_rate / 2:
            raise ValueError(f"fmax_hz ({self.fmax_hz}) must be at most half the sample_rate ({self.sample_rate / 2})")
        if self.fmin_hz >= self.fmax_hz:
            raise ValueError(f"fmin_hz ({self.fmin_hz}) must be below fmax_hz ({self.fmax_hz})")
        if self.hop > self.n_fft:
            raise ValueError(f"hop ({self.hop}) must not exceed n_fft ({self.n_fft})")
        if self.clip_samples < self.n_fft:
            raise ValueError(f"clip_samples ({self.clip_samples}) must be at least n_fft ({self.n_fft})")
        return self

    @property
    def frames(self) -> int:
        return self.clip_samples // self.hop

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, self.n_mels, self.frames)


class SeriesInput(_Input):
    """A time series of ``channels`` channels (CSV: one row per time step, one column per channel; or
    ``.npy`` [steps, channels]), centre-cropped or zero-padded to ``length`` steps; stored [channels, length]."""

    kind: Literal["series"]
    channels: int = Field(ge=1, le=1024)
    length: int = Field(ge=2, le=1 << 20)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.length)


class VectorInput(_Input):
    """A feature vector of ``dim`` values (``.npy``, shape [dim]); stored as is."""

    kind: Literal["vector"]
    dim: int = Field(ge=1, le=1 << 20)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dim,)


ModalitySpec = Annotated[ImageInput | AudioInput | SeriesInput | VectorInput, Field(discriminator="kind")]


class TaskSpec(BaseModel):
    """One task: what a federation learns. Identical on the coordinator and every device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    version: int = Field(1, ge=1)
    """Raise it whenever the file changes meaning; a federation keeps the version it was created with."""
    description: str = ""
    labels: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(min_length=2, max_length=_MAX_LABELS)
    """Class names in label order; a manifest's ``label`` column holds one of them."""
    label_text: str = "{label}"
    """How a label is described to the language model for the text anchors (``{label}`` is replaced)."""
    modalities: dict[str, ModalitySpec] = Field(min_length=1, max_length=16)
    model: dict[str, Any] = Field(default_factory=dict)
    """Sizes of the model (``ModelConfig`` fields); ``num_classes`` comes from ``labels``."""

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        seen: set[str] = set()
        for label in labels:
            if label in seen:
                raise ValueError(f"label {label!r} is listed twice")
            seen.add(label)
        return labels

    @field_validator("label_text")
    @classmethod
    def _template(cls, text: str) -> str:
        if "{label}" not in text:
            raise ValueError("label_text must contain {label}")
        return text

    @field_validator("modalities")
    @classmethod
    def _modality_names(cls, modalities: dict[str, Any]) -> dict[str, Any]:
        for name, spec in modalities.items():
            if not _NAME.match(name) or name in RESERVED_COLUMNS:
                raise ValueError(f"modality name {name!r} must be lower-case letters, digits and _ (starting with "
                                 f"a letter, at most 32) and not one of {', '.join(sorted(RESERVED_COLUMNS))}")
            values = 1
            for size in spec.shape:
                values *= size
            if values > _MAX_INPUT_VALUES:
                raise ValueError(f"modality {name!r} has {values:,} input values per sample, "
                                 f"at most {_MAX_INPUT_VALUES:,} are allowed")
        return modalities

    @model_validator(mode="after")
    def _model_config(self) -> TaskSpec:
        if "num_classes" in self.model and self.model["num_classes"] != len(self.labels):
            raise ValueError(f"model.num_classes ({self.model['num_classes']}) disagrees with the "
                             f"{len(self.labels)} labels; leave it out")
        self.edge_model_config()  # raises ValueError naming the field
        return self

    def edge_model_config(self) -> ModelConfig:
        """The model's :class:`ModelConfig`: sizes from ``[model]``, inputs from ``modalities``, classes from
        ``labels``."""
        if "inputs" in self.model:
            raise ValueError("[model] must not list inputs: they come from [modalities]")
        inputs = [InputSpec(name, spec.kind, spec.shape, spec.mean, spec.std, spec.extractor)
                  for name, spec in sorted(self.modalities.items())]
        return ModelConfig.from_dict({**self.model, "num_classes": len(self.labels), "inputs": inputs})

    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def label_descriptions(self) -> list[str]:
        """What the language model embeds for each label's text anchor, in label order."""
        return [self.label_text.replace("{label}", label) for label in self.labels]


def builtin_task_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("mlecs.tasks.builtin").iterdir()
                  if p.name.endswith(".toml"))


def builtin_task_text(name: str) -> str | None:
    """The text of the built-in task ``name``, or None when there is no such built-in."""
    if name not in builtin_task_names():
        return None
    return resources.files("mlecs.tasks.builtin").joinpath(f"{name}.toml").read_text(encoding="utf-8")


def parse_task(text: str, source: str = "task") -> TaskSpec:
    """Parses a task file's text; raises :class:`TaskError` naming ``source`` and the bad field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TaskError(f"{source}: not valid TOML: {exc}") from None
    try:
        return TaskSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'task'}: {err['msg']}"
                             for err in exc.errors())
        raise TaskError(f"{source}: {problems}") from None


def task_text(name_or_path: str | Path) -> str:
    """The text of a built-in task by name (``avmnist``) or of a task file by path; raises TaskError."""
    builtin = builtin_task_text(str(name_or_path))
    if builtin is not None:
        return builtin
    path = Path(name_or_path)
    if not path.is_file():
        raise TaskError(f"no task {str(name_or_path)!r}: not a file, and not a built-in task "
                        f"({', '.join(builtin_task_names())})")
    return path.read_text(encoding="utf-8")


def load_task(name_or_path: str | Path) -> TaskSpec:
    """Loads a built-in task by name (``avmnist``) or a task file by path."""
    return parse_task(task_text(name_or_path), str(name_or_path))
