"""Every Grafana panel's PromQL against a real Prometheus that scraped a real coordinator during a federation.

A coordinator (PostgreSQL + Redis) runs two committed rounds with four devices of three modality sets (one
of them a straggler whose late upload is refused), a credential refused three times and a revocation; Debian's
``prometheus`` scrapes its admin port every second with ``deploy/prometheus/prometheus.yml`` (targets
rewritten to this test's ports). Then each target of each dashboard in ``deploy/grafana/dashboards`` is
evaluated through the HTTP API: it must parse and return at least one series.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from edge_agent.client import CoordinatorClient
from edge_agent.errors import CredentialRejected, RequestRefused
from server.app import OBSERVE_INTERVAL_S
from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import RunningCoordinator, free_port, running_coordinator, wait_for_round
from tests.integration.test_grpc_loopback import _device, _federation, _request
from tests.integration.test_scheduling_modes import CHUNK, _train, _upload
from tools.render_dashboards import render_all

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "10m", "$federation": ".*"}
"""Grafana's built-in variables as it would fill them in for a short range with a 1 s scrape interval, and the
dashboards' own federation selector at its default (all)."""

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr with Grafana variables substituted) for every target."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, f"{path.name} / {panel['title']}: unsubstituted variable in {expr}"
                out.append((path.name, panel["title"], expr))
    return out


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is missing: `apt-get install prometheus` (tools/ensure_services.sh does)")
    return binary


@pytest.fixture
def coordinator(tmp_path: Path, make_postgres_database, redis_prefix) -> Iterator[RunningCoordinator]:
    settings = CoordinatorSettings(state_dir=tmp_path / "coordinator", database_url=make_postgres_database(),
                                   redis_url="redis://127.0.0.1:6379/0", redis_prefix=redis_prefix,
                                   scheduler_interval_s=0.2)
    with running_coordinator(settings) as running:
        yield running


def _scrape_config(admin_port: int, prometheus_port: int) -> dict:
    """The shipped config with 1 s intervals and this test's targets (job names kept: panels select on them)."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    targets = {"mlecs-coordinator": f"127.0.0.1:{admin_port}", "prometheus": f"127.0.0.1:{prometheus_port}"}
    # This test's coordinator runs without a heartbeat process and runs its cloud jobs itself (the in-process
    # worker, whose metrics are the coordinator's): those two jobs have nothing to scrape.
    config["scrape_configs"] = [job for job in config["scrape_configs"]
                                if job["job_name"] not in ("mlecs-heartbeats", "mlecs-workers")]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return dict(config)


@pytest.fixture
def prometheus(prometheus_binary: str, coordinator: RunningCoordinator, tmp_path: Path) -> Iterator[httpx.Client]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(_scrape_config(coordinator.coordinator.settings.admin_port, port)))
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if client.get("/-/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready within 30 s"
            time.sleep(0.2)
        yield client
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _query(prometheus: httpx.Client, expr: str) -> dict:
    response = prometheus.get("/api/v1/query", params={"query": expr})
    body = dict(response.json())
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {response.text}"
    return body


def _run_federation(c: RunningCoordinator) -> tuple[str, list[str]]:
    """Two committed rounds of a four-device fleet, each leaving a straggler whose late upload is refused;
    then a credential refused three times and the revocation of a device. Returns the federation's name and
    the revoked device's modalities."""
    federation = _federation(c, clients_per_round=3, overselect=0.34, min_updates=3, cloud_epochs=1)
    modality_sets = [["image"], ["audio"], ["audio", "image"], ["audio", "image"]]
    devices: dict[str, tuple[CoordinatorClient, list[str]]] = {}
    for i, modalities in enumerate(modality_sets):
        client, device_id = _device(c, federation["name"], f"dash-{i}", modalities)
        client.heartbeat(device_id)
        devices[device_id] = (client, modalities)
    for _ in range(2):
        started = c.admin.post(f"/v1/federations/{federation['id']}/rounds")
        assert started.status_code == 201, started.text
        round_ = started.json()
        invited = round_["participants"]
        assert len(invited) == 4 and round_["target_updates"] == 3, round_
        trained = {d: _train(devices[d][0], d, devices[d][1]) for d in invited}
        for device_id in invited[:3]:
            client, modalities = devices[device_id]
            _upload(client, device_id, *trained[device_id], modalities)
        committed = wait_for_round(c.admin, round_["id"], timeout_s=60)
        assert committed["state"] == "committed", committed
        straggler = invited[3]
        client, modalities = devices[straggler]
        task, payload = trained[straggler]
        with pytest.raises(RequestRefused, match="too late"):
            client.upload(_request(task, straggler, payload, modalities), payload, 0, CHUNK)

    intruder = CoordinatorClient(c.grpc_address, task_wait_s=0)  # a refused credential: a refusal by reason
    intruder.authenticate(next(iter(devices)), "not-the-secret")
    for _ in range(3):  # within the recorder's interval: the repeats are thinned (counted, not written)
        with pytest.raises(CredentialRejected):
            intruder.heartbeat(next(iter(devices)))
    revoked = c.admin.post(f"/v1/devices/{invited[3]}/revoke")
    assert revoked.status_code == 200, revoked.text
    for device_id, (client, _) in devices.items():
        if device_id != invited[3]:
            client.heartbeat(device_id)
    return federation["name"], devices[invited[3]][1]


def test_every_dashboard_panel_query_parses_and_returns_data(coordinator, prometheus):
    queries = panel_queries()
    assert len(queries) >= 30 and {name for name, _, _ in queries} == {
        "fleet.json", "rounds.json", "learning.json", "traffic.json", "health.json"}
    pictures = os.environ.get("MLECS_DASHBOARD_PICTURES")  # set: also draw the README's pictures of this run
    started = time.time()
    if pictures:
        time.sleep(5)  # a baseline before the federation, so counters start at zero in the pictures
    name, revoked_modalities = _run_federation(coordinator)
    # Other tests in this process may have left their federations' gauges in the registry: this one's only.
    ours = f'federation="{name}"'

    # Wait until Prometheus holds the end state (the last commit scraped, the fleet gauges refreshed after the
    # revocation), then ask every panel.
    def value(expr: str) -> float:
        result = _query(prometheus, expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else float("nan")

    committed = _exported(coordinator, 'mlecs_rounds_total{state="committed"}')
    deadline = time.monotonic() + max(30.0, 4 * OBSERVE_INTERVAL_S)
    while not (value('sum(mlecs_rounds_total{state="committed"})') == committed
               and value("sum(max by (modalities) (mlecs_devices_enrolled))") == 3):
        assert time.monotonic() < deadline, "prometheus did not see the federation's end state"
        time.sleep(0.5)
    # A counter born late (the first thinned refusal) needs two scrapes before increase() has a value: ask again
    # until the same deadline rather than once.
    while empty := [(name, title, expr) for name, title, expr in queries
                    if not _query(prometheus, expr)["data"]["result"]]:
        assert time.monotonic() < deadline, "panels without data:\n" + "\n".join(
            f"{n} / {t}: {e}" for n, t, e in empty)
        time.sleep(0.5)

    # The data is what the federation did, not just present.
    assert committed >= 2
    assert value(f'max(mlecs_round_participants{{{ours}, kind="stragglers"}})') == 1
    assert value(f'max(mlecs_round_participants{{{ours}, kind="target"}})') == 3
    assert value('sum(mlecs_update_rejections_total{reason="late"})') >= 2
    assert value('sum(mlecs_refusals_total{reason="late"})') >= 2
    assert value("sum(mlecs_device_revocations_total)") >= 1
    both = 2 - (revoked_modalities == ["audio", "image"])
    assert value('max(mlecs_devices_enrolled{modalities="audio,image"})') == both
    assert value('max(mlecs_devices_online{modalities="audio,image"})') == both
    assert value('min(mlecs_dependency_up)') == 1
    assert value('sum(mlecs_refusals_unrecorded_total{cause="thinned"})') >= 2
    assert value(f'max(mlecs_round_modality_coverage{{{ours}, modality="image"}})') > 0
    shares = _query(prometheus, f"mlecs_round_aggregation_weight_share{{{ours}}}")["data"]["result"]
    assert abs(sum(float(s["value"][1]) for s in shares) - 1) < 1e-6, shares
    assert 0 < value("sum(mlecs_update_wire_bytes_total) / sum(mlecs_update_raw_bytes_total)") < 1  # fp16
    assert 0 <= value(f'max(mlecs_global_accuracy{{{ours}, modalities="cloud"}})') <= 1
    # The dashboards' federation selector lists the federation (the label values it queries).
    federations = {s["metric"]["federation"] for s in _query(prometheus, "mlecs_round_participants")["data"]["result"]}
    assert name in federations
    if pictures:
        time.sleep(10)  # and an idle tail, so rates fall back
        render_all(prometheus, Path(pictures), start=started, end=time.time(), step_s=1, rate_interval="4s")


def _exported(c: RunningCoordinator, sample: str) -> float:
    """One sample's value in the coordinator's own /metrics text."""
    for line in c.admin.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} missing from /metrics")
