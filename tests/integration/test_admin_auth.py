"""Admin API authorisation against a real coordinator: who is let in, who is refused (401/403), that a refusal
changes nothing in the database, that every action lands in the audit log, and that tokens are kept hashed."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select, text

from server.config import CoordinatorSettings
from server.persistence.tables import metadata
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator

TINY = {"model": {"backbone": "tiny"}, "server_learning": False}


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    with running_coordinator(CoordinatorSettings(state_dir=tmp_path_factory.mktemp("auth"))) as running:
        yield running


def _name() -> str:
    return f"fed-{uuid.uuid4().hex[:8]}"


def _federation(c: RunningCoordinator) -> dict:
    response = c.admin.post("/v1/federations", json={"name": _name(), "config": TINY})
    assert response.status_code == 201, response.text
    return dict(response.json())


def _database(c: RunningCoordinator) -> str:
    return c.coordinator.settings.resolved_database_url()


def _snapshot(c: RunningCoordinator) -> dict[str, list[tuple]]:
    """Every row of every table but the audit log, which refusals are meant to write to."""
    engine = create_engine(_database(c))
    try:
        with engine.connect() as connection:
            return {table.name: sorted(map(tuple, connection.execute(select(table))), key=repr)
                    for table in metadata.sorted_tables if table.name != "audit_log"}
    finally:
        engine.dispose()


def _audit(c: RunningCoordinator, **filters) -> list[dict]:
    response = c.admin.get("/v1/audit", params=filters)
    assert response.status_code == 200, response.text
    return list(response.json())


def _refused_without_change(c: RunningCoordinator, client: httpx.Client, method: str, path: str, status: int,
                            json: dict | None = None) -> httpx.Response:
    before = _snapshot(c)
    response = client.request(method, path, json=json)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert _snapshot(c) == before
    return response


def test_health_probes_and_metrics_need_no_token(c: RunningCoordinator) -> None:
    anonymous = c.client(None)
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/readyz").status_code == 200
    assert anonymous.get("/metrics").status_code == 200


def test_a_request_without_a_token_is_401_with_a_bearer_challenge_and_creates_nothing(c: RunningCoordinator) -> None:
    name = _name()
    response = _refused_without_change(c, c.client(None), "POST", "/v1/federations", 401,
                                       {"name": name, "config": TINY})

    assert response.headers["www-authenticate"] == 'Bearer realm="mlecs-admin"'
    assert "missing admin token" in response.json()["detail"]
    assert c.admin.get(f"/v1/federations/{name}").status_code == 404


def test_an_unknown_or_malformed_token_is_401_invalid_token(c: RunningCoordinator) -> None:
    for header in ("Bearer mlecs_at_not-a-real-token", "Bearer something-else", "Basic dXNlcjpwYXNz", "Bearer"):
        client = httpx.Client(base_url=str(c.admin.base_url), headers={"Authorization": header})
        with client:
            response = _refused_without_change(c, client, "POST", "/v1/federations", 401,
                                               {"name": _name(), "config": TINY})
        assert 'error="invalid_token"' in response.headers["www-authenticate"], header
        assert response.json()["title"] == "UnauthenticatedError"


def test_an_expired_token_is_401_naming_the_expiry(c: RunningCoordinator) -> None:
    token = c.token_for("admin", name="short-lived", expires_in=timedelta(milliseconds=200))
    client = c.client(token)
    assert client.get("/v1/federations").status_code == 200
    time.sleep(0.3)

    response = _refused_without_change(c, client, "POST", "/v1/federations", 401, {"name": _name(), "config": TINY})
    assert "'short-lived' expired at" in response.json()["detail"]
    assert client.get("/v1/federations").status_code == 401


def test_a_revoked_token_is_refused_on_its_next_request(c: RunningCoordinator) -> None:
    token = c.token_for("operate", name="to-revoke")
    client = c.client(token)
    assert client.get("/v1/federations").status_code == 200
    token_id = next(t["id"] for t in c.admin.get("/v1/tokens").json() if t["name"] == "to-revoke")

    revoked = c.admin.post(f"/v1/tokens/{token_id}/revoke")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"

    response = _refused_without_change(c, client, "POST", "/v1/federations", 401, {"name": _name(), "config": TINY})
    assert "'to-revoke' was revoked at" in response.json()["detail"]
    assert c.admin.post(f"/v1/tokens/{token_id}/revoke").json()["revoked_at"] == revoked.json()["revoked_at"]


def test_a_read_token_may_read_but_not_operate(c: RunningCoordinator) -> None:
    federation = _federation(c)
    reader = c.client(c.token_for("read", name="dashboard"))
    assert reader.get(f"/v1/federations/{federation['name']}").status_code == 200
    assert reader.get(f"/v1/federations/{federation['name']}/rounds").json() == []

    for path, body in (("/v1/federations", {"name": _name(), "config": TINY}),
                       (f"/v1/federations/{federation['name']}/rounds", None),
                       (f"/v1/federations/{federation['name']}/pause", None),
                       (f"/v1/federations/{federation['name']}/stop", None),
                       (f"/v1/federations/{federation['name']}/enrolment-tokens", {"expires_in_hours": 1})):
        response = _refused_without_change(c, reader, "POST", path, 403, body)
        assert response.headers["www-authenticate"] == (
            'Bearer realm="mlecs-admin", error="insufficient_scope", scope="operate"'), path
        assert response.json()["detail"] == "this operation needs the 'operate' scope; admin token 'dashboard' has read"
    assert c.admin.get(f"/v1/federations/{federation['name']}").json()["state"] == "active"


def test_an_operate_token_may_operate_but_not_administer(c: RunningCoordinator) -> None:
    federation = _federation(c)
    operator = c.client(c.token_for("operate", name="ci"))
    assert operator.post(f"/v1/federations/{federation['name']}/pause").json()["state"] == "paused"
    assert operator.get("/v1/federations").status_code == 200  # operate includes read

    version = federation["current_version_id"]
    for method, path, body in (("POST", "/v1/tokens", {"name": "x", "scopes": ["admin"]}),
                               ("GET", "/v1/tokens", None),
                               ("GET", "/v1/audit", None),
                               ("POST", f"/v1/federations/{federation['name']}/versions/{version}/promote", None),
                               ("POST", "/v1/devices/some-device/revoke", None)):
        response = _refused_without_change(c, operator, method, path, 403, body)
        assert 'scope="admin"' in response.headers["www-authenticate"], path


def test_every_v1_operation_in_the_openapi_document_refuses_an_anonymous_caller(c: RunningCoordinator) -> None:
    document = c.admin.get("/openapi.json").json()
    anonymous = c.client(None)
    operations = [(method.upper(), path) for path, item in document["paths"].items() for method in item
                  if path.startswith("/v1/")]
    assert len(operations) >= 25
    for method, path in operations:
        concrete = path.replace("{", "").replace("}", "")  # /v1/rounds/round_id: any value
        response = anonymous.request(method, concrete, json={} if method == "POST" else None)
        assert response.status_code == 401, (method, path, response.text)
        assert document["paths"][path][method.lower()]["security"] == [{"HTTPBearer": []}]


def test_actions_and_refusals_are_audited_with_actor_outcome_and_detail(c: RunningCoordinator) -> None:
    federation = _federation(c)
    name = federation["name"]
    reader = c.client(c.token_for("read", name=f"reader-{name}"))
    reader.get(f"/v1/federations/{name}")                                   # a GET: not audited
    reader.post(f"/v1/federations/{name}/stop")                              # 403
    c.client(None).post(f"/v1/federations/{name}/pause")                     # 401, anonymous
    c.admin.post(f"/v1/federations/{name}/rounds")                           # 409: no live devices
    c.admin.post(f"/v1/federations/{name}/pause")                            # ok

    entries = [e for e in _audit(c, limit=1000) if name in e["path"]]  # the create's path names no federation
    assert [(e["actor_name"], e["action"], e["method"], e["status"], e["outcome"]) for e in entries] == [
        ("harness", "federations.pause", "POST", 200, "ok"),
        ("harness", "rounds.launch", "POST", 409, "refused"),
        ("anonymous", "federations.pause", "POST", 401, "refused"),
        (f"reader-{name}", "federations.stop", "POST", 403, "refused"),
    ]
    assert "quorum" in entries[1]["detail"] and "'operate' scope" in entries[3]["detail"]
    assert entries[2]["actor_id"] is None and entries[3]["actor_id"] is not None


def test_the_audit_log_filters_by_actor_action_and_time(c: RunningCoordinator) -> None:
    token_name = f"auditor-{uuid.uuid4().hex[:6]}"
    operator = c.client(c.token_for("operate", name=token_name))
    first = operator.post("/v1/federations", json={"name": _name(), "config": TINY}).json()
    operator.post(f"/v1/federations/{first['name']}/stop")

    mine = _audit(c, actor=token_name)
    assert [e["action"] for e in mine] == ["federations.stop", "federations.create"]
    assert mine[1]["detail"] == f"created federation {first['name']} ({first['id']})"
    assert [e["action"] for e in _audit(c, actor=token_name, action="federations.stop")] == ["federations.stop"]
    assert [e["action"] for e in _audit(c, actor=mine[0]["actor_id"], limit=1)] == ["federations.stop"]
    assert _audit(c, actor=token_name, since=mine[0]["at"]) == [mine[0]]
    assert c.admin.get("/v1/audit", params={"limit": 0}).status_code == 422
    assert c.admin.get("/v1/audit", params={"since": "yesterday"}).status_code == 422


def test_an_unknown_path_and_a_wrong_method_are_audited_as_unknown(c: RunningCoordinator) -> None:
    marker = uuid.uuid4().hex[:8]
    assert c.admin.post(f"/v1/nothing-{marker}").status_code == 404
    assert c.admin.delete(f"/v1/federations/{marker}").status_code == 405
    entries = [e for e in _audit(c, limit=50) if marker in e["path"]]
    assert [(e["action"], e["status"]) for e in entries] == [("unknown", 405), ("unknown", 404)]


def test_token_plaintext_is_never_stored_or_listed(c: RunningCoordinator) -> None:
    created = c.admin.post("/v1/tokens", json={"name": "kept-hashed", "scopes": ["read"], "expires_in_days": 1})
    assert created.status_code == 201, created.text
    plaintext = created.json()["token"]
    assert plaintext.startswith("mlecs_at_") and len(plaintext) > 40

    engine = create_engine(_database(c))
    try:
        with engine.connect() as connection:
            rows = [dict(r._mapping) for r in connection.execute(text("SELECT * FROM admin_tokens"))]
            dump = repr([list(r) for t in metadata.sorted_tables for r in connection.execute(select(t))])
    finally:
        engine.dispose()
    row = next(r for r in rows if r["name"] == "kept-hashed")
    assert row["token_hash"] == hashlib.sha256(plaintext.encode()).hexdigest()
    assert plaintext not in dump and plaintext[len("mlecs_at_"):] not in dump

    listed = c.admin.get("/v1/tokens").json()
    assert not any("token" in t or "token_hash" in t for t in listed)
    assert next(t for t in listed if t["name"] == "kept-hashed")["scopes"] == ["read"]
    assert c.client(plaintext).get("/v1/federations").status_code == 200


def test_a_token_body_with_an_unknown_scope_is_422_problem_json(c: RunningCoordinator) -> None:
    response = c.admin.post("/v1/tokens", json={"name": "x", "scopes": ["root"]})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["errors"][0]["loc"] == ["body", "scopes", "0"] and "scopes.0" in body["detail"]


@pytest.mark.postgres
@pytest.mark.redis
def test_on_postgres_a_read_token_cannot_launch_a_round_and_the_refusal_is_audited(
        tmp_path: Path, make_postgres_database, redis_prefix: str) -> None:
    settings = CoordinatorSettings(state_dir=tmp_path, database_url=make_postgres_database(),
                                   redis_url="redis://127.0.0.1:6379/0", redis_prefix=redis_prefix)
    with running_coordinator(settings) as pg:
        federation = _federation(pg)
        reader = pg.client(pg.token_for("read", name="pg-reader"))
        _refused_without_change(pg, reader, "POST", f"/v1/federations/{federation['name']}/rounds", 403)
        assert pg.admin.get(f"/v1/federations/{federation['name']}/rounds").json() == []
        [entry] = _audit(pg, actor="pg-reader")
        assert (entry["action"], entry["status"], entry["outcome"]) == ("rounds.launch", 403, "refused")


def test_a_query_parameter_the_operation_does_not_take_is_refused_not_ignored(c: RunningCoordinator) -> None:
    response = c.admin.get("/v1/audit", params={"acter": "ops"})  # a typo must not return the unfiltered log
    assert response.status_code == 422
    assert response.json()["detail"] == ("unknown query parameter(s) 'acter'; this operation takes: action, actor, "
                                         "limit, since")
    assert c.admin.get("/v1/federations", params={"x": "1"}).status_code == 422
    assert c.client(None).get("/v1/federations", params={"x": "1"}).status_code == 401  # who first, then what
    assert c.admin.get("/v1/audit", params={"actor": "ops", "limit": 1}).status_code == 200
