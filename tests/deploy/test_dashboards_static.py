"""The Prometheus config, Grafana provisioning and dashboards checked without running either: the files agree
with each other and every metric a panel asks for is one the coordinator exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from server import metrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = {path.stem: path for path in sorted((GRAFANA / "dashboards").glob("*.json"))}
EXTERNAL_METRICS = {"up", "process_resident_memory_bytes", "process_cpu_seconds_total"}
"""Series that are not in server/metrics.py: Prometheus's own ``up`` and prometheus_client's process collector."""
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def _dashboard(name: str) -> dict:
    return dict(json.loads(DASHBOARDS[name].read_text()))


def _datasource_uid() -> str:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [datasource] = provisioned["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    return str(datasource["uid"])


def exported_series() -> set[str]:
    """Every series name server/metrics.py declares, with the suffixes prometheus_client adds."""
    names: set[str] = set()
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        [family] = metric.describe()
        if isinstance(metric, Counter):
            names.add(f"{family.name}_total")
        elif isinstance(metric, Histogram):
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        else:
            assert isinstance(metric, Gauge), metric
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: identifiers that are not functions, keywords, label
    names (inside ``{}`` or ``by (...)``), durations or strings."""
    stripped = re.sub(r'"[^"]*"', "", expr)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", stripped)
    tokens = re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?", stripped)
    return {t.group(0) for t in tokens if t.group(1) is None and t.group(0).lower() not in PROMQL_WORDS}


def test_the_five_dashboards_exist_with_unique_uids_and_panel_ids():
    assert set(DASHBOARDS) == {"fleet", "rounds", "learning", "traffic", "health"}
    uids = [_dashboard(name)["uid"] for name in DASHBOARDS]
    assert len(set(uids)) == len(uids) and all(re.fullmatch(r"[a-z0-9-]{1,40}", uid) for uid in uids), uids
    for name in DASHBOARDS:
        dashboard = _dashboard(name)
        assert dashboard["title"].startswith("mlecs / ") and isinstance(dashboard["schemaVersion"], int)
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"


def test_every_panel_uses_the_provisioned_datasource_and_has_queries():
    uid = _datasource_uid()
    for name in DASHBOARDS:
        for panel in _dashboard(name)["panels"]:
            where = f"{name} / {panel.get('title')}"
            assert panel["title"] and panel["description"], f"{where}: title and description"
            assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table"}, where
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, where
            grid = panel["gridPos"]
            assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, where
            assert panel["targets"], f"{where}: no targets"
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(set(ref_ids)) == len(ref_ids), where
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid and target["expr"].strip(), where


def test_every_metric_a_panel_reads_is_exported_by_the_coordinator():
    known = exported_series() | EXTERNAL_METRICS
    used: set[str] = set()
    for name in DASHBOARDS:
        for panel in _dashboard(name)["panels"]:
            for target in panel["targets"]:
                names = metric_names(target["expr"])
                assert names, f"{name} / {panel['title']}: no metric in {target['expr']}"
                assert names <= known, f"{name} / {panel['title']}: unknown metrics {names - known}"
                used |= names
    # Every metric the coordinator exports is on some dashboard (a histogram through any of its series).
    def family(series: str) -> str:
        return re.sub(r"_(bucket|sum|count)$", "", series)
    unused = {family(s) for s in exported_series()} - {family(s) for s in used}
    assert not unused, f"exported but on no dashboard: {sorted(unused)}"


def test_metric_name_extraction_sees_selectors_and_skips_labels_and_functions():
    expr = ('histogram_quantile(0.99, sum by (le, method) (rate(mlecs_rpc_duration_seconds_bucket{code!="OK"}[5m])))'
            ' / on (method) group_left sum(up{job="x"}) or vector(1)')
    assert metric_names(expr) == {"mlecs_rpc_duration_seconds_bucket", "up"}


def test_the_dashboard_provider_loads_the_dashboards_from_where_compose_mounts_them():
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mlecs.yml").read_text())
    [entry] = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_the_coordinators_admin_port():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    coordinator = jobs["mlecs-coordinator"]
    assert coordinator.get("metrics_path", "/metrics") == "/metrics"
    assert coordinator["static_configs"] == [{"targets": ["coordinator:8080"]}]
    assert jobs["mlecs-heartbeats"]["static_configs"] == [{"targets": ["coordinator:9102"]}]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed: syntax not checked")
    checked = subprocess.run([promtool, "check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
