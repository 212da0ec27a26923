"""Tasks declared without code: which modalities a federation learns from, their inputs, its labels, its model.

A task is a TOML file (``docs/datasets.md`` describes it); AV-MNIST ships as the built-in tasks ``avmnist``
and ``avmnist-hard``. Plain data: importable without torch.
"""

from mlecs.tasks.spec import (
    KINDS,
    AudioInput,
    ImageInput,
    ModalitySpec,
    SeriesInput,
    TaskError,
    TaskSpec,
    VectorInput,
    builtin_task_names,
    builtin_task_text,
    load_task,
    parse_task,
    task_text,
)

__all__ = [
    "KINDS",
    "AudioInput",
    "ImageInput",
    "ModalitySpec",
    "SeriesInput",
    "TaskError",
    "TaskSpec",
    "VectorInput",
    "builtin_task_names",
    "builtin_task_text",
    "load_task",
    "parse_task",
    "task_text",
]
