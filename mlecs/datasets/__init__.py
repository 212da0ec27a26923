"""On-device datasets: a directory of ``manifest.csv`` and sample files, read as its task declares.

The format is described in ``docs/datasets.md``. A device reads nothing else; ``mlecs data check`` prints
the same report the agent logs at start.
"""

from mlecs.datasets.dataset import (
    MANIFEST,
    SPLITS,
    DatasetError,
    DatasetReport,
    MultimodalData,
    Problem,
    check_dataset,
    load_dataset,
)
from mlecs.datasets.readers import InputError, read_input

__all__ = [
    "MANIFEST",
    "SPLITS",
    "DatasetError",
    "DatasetReport",
    "InputError",
    "MultimodalData",
    "Problem",
    "check_dataset",
    "load_dataset",
    "read_input",
]
