"""Fuzzes the admin API from its own OpenAPI document (schemathesis, stateless): every operation, valid and
invalid inputs, with an admin token. Nothing may answer 5xx, every answer must match the document (status,
content type, body schema), invalid input must be refused, and an operation that succeeds with the token
must refuse the same request without one.

The app runs in-process (ASGI) with every service wired as in the coordinator, on PostgreSQL: stricter than
SQLite about what a value may hold (a NUL byte in a path, say), so it finds more.
The schema is read at import (parametrisation needs it); the services are attached when the module's fixture
runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from sqlalchemy import text

from server.composition import build_services
from server.config import CoordinatorSettings
from server.domain.federation_config import FederationConfig
from server.persistence.database import create_engine_for
from server.persistence.tables import metadata
from server.transport.admin_api import AdminServices, create_admin_app

EXAMPLES_PER_OPERATION = 12
"""Cases per operation and mode: about 25 operations x 2 modes stay well under a minute on two cores."""

APP = create_admin_app(cast(AdminServices, None))  # services attached by the ``token`` fixture
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
# The test sends the token itself; schemathesis leaves the Authorization header alone (its ignored_auth check
# still repeats successful requests without it).
schema.config.generation.update(max_examples=EXAMPLES_PER_OPERATION, allow_x00=True, with_security_parameters=False,
                                modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory, migrated_postgres_url: str) -> Iterator[str]:
    """Wires APP to real services on the session's emptied PostgreSQL database; yields an admin token."""
    engine = create_engine_for(migrated_postgres_url)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(t.name for t in metadata.sorted_tables)} RESTART IDENTITY "
                                "CASCADE"))
    engine.dispose()
    state: Path = tmp_path_factory.mktemp("fuzz")
    services = build_services(CoordinatorSettings(state_dir=state, database_url=migrated_postgres_url,
                                                  open_enrolment=True, allow_plaintext=True))
    # The name the OpenAPI examples use, so example-based cases reach a real federation.
    services.federations.create("avmnist-demo", FederationConfig(model={"backbone": "tiny"}, server_learning=False))
    APP.state.services = services.admin_services()
    try:
        yield services.admin_tokens.create("fuzz", ["admin"], None, "tests").plaintext
    finally:
        APP.state.services = None
        services.refusals.close()
        services.ctx.presence.close()


def _cheap_model(case: Any) -> None:
    """A created federation builds its model and may evaluate it on AV-MNIST: seconds per case with the default
    MiniLM backbone. The fuzz keeps everything else generated but asks for the tiny test model (an invalid
    ``config`` or ``model`` is left as generated: it is refused before anything is built)."""
    body = case.body
    if case.method == "POST" and case.path == "/v1/federations" and isinstance(body, dict):
        config = body.setdefault("config", {})  # optional, and its defaults build MiniLM
        if isinstance(config, dict) and isinstance(config.get("model", {}), dict):
            config["model"] = {"backbone": "tiny"}  # any object is schema-valid: no invalid case is masked
            if isinstance(config.get("server_learning", False), bool):  # a non-boolean is an invalid case: kept
                config["server_learning"] = False


@schema.parametrize()
def test_the_admin_api_survives_its_own_schema(case: Any, token: str) -> None:
    _cheap_model(case)
    excluded = []
    if case.method == "POST" and case.path == "/v1/federations":
        # A config can be schema-valid and still contradict itself (exclude_above without a robust_rule, say):
        # those cross-field rules are refused with 422, which this check would count as rejected valid data.
        excluded.append(positive_data_acceptance)
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, excluded_checks=excluded)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/federations/a%00b"), ("POST", "/v1/federations/a%00b/stop"), ("GET", "/v1/rounds/%00"),
    ("GET", "/v1/devices/%00"), ("GET", "/v1/audit?actor=a%00"), ("POST", "/v1/tokens/%00/revoke")])
def test_a_nul_byte_is_refused_as_invalid_and_still_audited(token: str, method: str, path: str) -> None:
    # Found beside the fuzz: PostgreSQL text cannot hold NUL, and these were 500s. The schema now says so.
    with TestClient(APP) as client:
        response = client.request(method, path, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 422, response.text
        assert "should match pattern" in response.json()["detail"]
        if method == "POST":
            [entry] = client.get("/v1/audit", params={"limit": 1},
                                 headers={"Authorization": f"Bearer {token}"}).json()
            assert entry["path"] == path.replace("%00", "\\x00") and entry["status"] == 422
