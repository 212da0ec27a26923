"""Exporting a coordinator's global version as a model directory (``mlecs model export``, ``mlecs fleet
--model-out``), through the admin API."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mlecs.fleet.admin_client import AdminClient


def export_version(client: AdminClient, version_id: str, out: Path) -> dict[str, Any]:
    """Downloads a version and its federation's configuration and writes the model directory; returns the version."""
    from mlecs.codec import decode_tensors
    from mlecs.inference import portable, write_model_directory
    from mlecs.model.config import ModelConfig

    version = client.get(f"/v1/versions/{version_id}")
    federation = client.get(f"/v1/federations/{version['federation_id']}")
    payload, headers = client.get_bytes(f"/v1/versions/{version_id}/adapter")
    if hashlib.sha256(payload).hexdigest() != headers.get("x-checksum-sha256", ""):
        raise ValueError("the downloaded weights' sha256 does not match the coordinator's")
    config = federation["config"]
    model, task_text = portable(ModelConfig.from_dict(dict(config.get("model") or {})), config.get("task"))
    write_model_directory(out, decode_tensors(payload), model, seed=int(config.get("seed", 0)), task_text=task_text,
                          source={"federation": federation["name"], "version_id": version_id,
                                  "round_number": version["round_number"], "metrics": version["metrics"]})
    return dict(version)
