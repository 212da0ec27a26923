"""Every number of a federation config is bounded at the admin API: a value out of bounds is a 422 naming
the field and stores nothing, and a config with every number at its bound creates a federation whose
rounds launch and whose devices get their task (no accepted config makes a later call fail)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.client import CoordinatorClient
from edge_agent.tasks import TrainTask
from server.config import CoordinatorSettings
from server.domain.federation_config import CONFIG_BOUNDS
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator

TINY = {"model": {"backbone": "tiny"}, "server_learning": False}


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    settings = CoordinatorSettings(state_dir=tmp_path_factory.mktemp("bounds"), scheduler_interval_s=0.2)
    with running_coordinator(settings) as running:
        yield running


def _names(c: RunningCoordinator) -> set[str]:
    response = c.admin.get("/v1/federations")
    assert response.status_code == 200, response.text
    return {f["name"] for f in response.json()}


def _beyond(name: str) -> int | float:
    bounds = CONFIG_BOUNDS[name]
    high = bounds.high if bounds.high_open else bounds.high * 2 + 1
    return int(high) if float(high).is_integer() else high


@pytest.mark.parametrize(("field", "value"), [
    # The values the attack on the coordinator used: each was accepted, then broke every task or launch.
    ("seed", 2**80), ("public_epochs", 2**62), ("batch_size", 2**70), ("round_deadline_s", 1e308),
    *[(name, _beyond(name)) for name in CONFIG_BOUNDS],
])
def test_a_number_beyond_its_bound_is_a_422_naming_the_field_and_nothing_is_stored(
        c: RunningCoordinator, field: str, value: float) -> None:
    before = _names(c)
    name = f"bad-{uuid.uuid4().hex[:8]}"

    response = c.admin.post("/v1/federations", json={"name": name, "config": {**TINY, field: value}})

    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert ["body", "config", field] in [e["loc"] for e in problem["errors"]], problem
    assert f"config.{field}" in problem["detail"]
    assert _names(c) == before


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_json_numbers_are_refused(c: RunningCoordinator, literal: str) -> None:
    body = f'{{"name": "nan-{uuid.uuid4().hex[:6]}", "config": {{"round_deadline_s": {literal}}}}}'

    response = c.admin.post("/v1/federations", content=body, headers={"content-type": "application/json"})

    assert response.status_code == 422, response.text
    assert "config.round_deadline_s" in response.json()["detail"]


def _at_bounds() -> dict[str, Any]:
    """Every number at its high bound (just inside an open one), with the rules that let each be set."""
    config: dict[str, Any] = {}
    for name, bounds in CONFIG_BOUNDS.items():
        value: float = bounds.high
        if bounds.high_open:
            value = bounds.high - 1e-6 * max(1.0, bounds.high)
        config[name] = int(value) if float(value).is_integer() else value
    return {**config, **TINY, "robust_rule": "trimmed_mean", "min_updates": 1, "clients_per_round": 100_000}


def test_a_config_with_every_number_at_its_bound_runs(c: RunningCoordinator) -> None:
    config = _at_bounds()
    name = f"edge-{uuid.uuid4().hex[:8]}"
    created = c.admin.post("/v1/federations", json={"name": name, "config": config})
    assert created.status_code == 201, created.text
    client = CoordinatorClient(c.grpc_address, task_wait_s=0)
    device_id, secret, _ = client.enrol(name, "cam", ["image", "audio"])
    client.authenticate(device_id, secret)

    opened = c.admin.post(f"/v1/federations/{name}/rounds")
    assert opened.status_code == 201, opened.text
    task = client.get_task(device_id)

    assert isinstance(task, TrainTask), task
    assert (task.seed, task.batch_size, task.public_epochs) == (2**32 - 1, 65_536, 1000)
    round_ = c.admin.get(f"/v1/rounds/{opened.json()['id']}").json()
    assert round_["state"] == "open" and round_["deadline_at"] is not None
    assert json.loads(json.dumps(round_))  # the round reads back as plain JSON


def test_the_openapi_examples_of_the_config_fields_make_together_a_config_the_coordinator_accepts(
        c: RunningCoordinator) -> None:
    schemas = c.admin.get("/openapi.json").json()["components"]["schemas"]
    properties = schemas["FederationConfigBody"]["properties"]
    examples = {name: spec["examples"][0] for name, spec in properties.items() if spec.get("examples")}
    assert {"clip_norm", "exclude_above", "exclude_cosine_below", "robust_rule"} <= set(examples)

    response = c.admin.post("/v1/federations", json={"name": f"examples-{uuid.uuid4().hex[:6]}",
                                                      "config": {**examples, **TINY}})

    assert response.status_code == 201, response.text
