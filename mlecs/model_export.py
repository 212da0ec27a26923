"""Exporting a coordinator's global version as a model directory (``mlecs model export``, ``mlecs fleet
--model-out``), through the admin API."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlecs.fleet.admin_client import AdminClient


def task_text_of(config: dict[str, Any]) -> str:
    """The task a federation's model reads raw files with: its own, or for a federation without one (the
    bundled AV-MNIST) the built-in ``avmnist`` task, whose extractor standardises what the loader did."""
    from mlecs.model.config import AVMNIST_INPUTS, ModelConfig
    from mlecs.tasks import builtin_task_text

    if config.get("task"):
        return str(config["task"])
    if ModelConfig.from_dict(dict(config.get("model") or {})).inputs != AVMNIST_INPUTS:
        raise ValueError("the federation has no task and reads other inputs than AV-MNIST's")
    text = builtin_task_text("avmnist")
    assert text is not None
    return text


def export_version(client: AdminClient, version_id: str, out: Path) -> dict[str, Any]:
    """Downloads a version and its federation's configuration and writes the model directory; returns the version."""
    from mlecs.codec import decode_tensors
    from mlecs.inference import write_model_directory
    from mlecs.model.config import ModelConfig
    from mlecs.tasks import parse_task

    version = client.get(f"/v1/versions/{version_id}")
    federation = client.get(f"/v1/federations/{version['federation_id']}")
    payload, headers = client.get_bytes(f"/v1/versions/{version_id}/adapter")
    if hashlib.sha256(payload).hexdigest() != headers.get("x-checksum-sha256", ""):
        raise ValueError("the downloaded weights' sha256 does not match the coordinator's")
    config = federation["config"]
    task_text = task_text_of(config)
    model = ModelConfig.from_dict(dict(config.get("model") or {}))
    if not config.get("task"):  # the task's inputs: the same tensors, standardised in the extractor
        model = replace(model, inputs=parse_task(task_text).edge_model_config().inputs)
    write_model_directory(out, decode_tensors(payload), model, seed=int(config.get("seed", 0)), task_text=task_text,
                          source={"federation": federation["name"], "version_id": version_id,
                                  "round_number": version["round_number"], "metrics": version["metrics"]})
    return dict(version)
