"""Admin API bodies for access control (tokens, audit log) and the problem+json error body (pydantic)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.domain.models import AdminToken, AuditEntry
from server.transport.admin_schemas import JsonBody

ScopeName = Literal["read", "operate", "admin"]
TOKEN_NAME_PATTERN = r"^[!-~]([ -~]*[!-~])?$"
"""Printable ASCII without surrounding spaces, as ``AdminTokenService`` requires."""

_TOKEN_EXAMPLE: dict[str, Any] = {
    "id": "3f1c9a0e5b7d4c2a9e8f6b1d0c3a5e7f", "name": "ci-deployer", "scopes": ["operate"],
    "created_by": "token:root (8d2b...)", "created_at": "2026-01-05T09:30:00Z", "expires_at": "2026-04-05T09:30:00Z",
    "revoked_at": None, "last_used_at": "2026-01-06T14:02:11Z", "state": "active"}


class Problem(BaseModel):
    """An error (RFC 9457 problem details): ``detail`` says what was wrong."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"type": "about:blank", "title": "InsufficientScopeError", "status": 403,
         "detail": "this operation needs the 'operate' scope; admin token 'dashboard' has read", "retryable": False}]})

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    retryable: bool = False
    errors: list[dict[str, Any]] | None = Field(
        None, description="Validation errors (422 only): where (loc), what (msg) and the error type")


class CreateTokenBody(JsonBody):
    model_config = ConfigDict(json_schema_extra={
        "examples": [{"name": "ci-deployer", "scopes": ["operate"], "expires_in_days": 90}]})

    name: str = Field(min_length=1, max_length=100, pattern=TOKEN_NAME_PATTERN,
                      description="Who or what holds the token (shown in the audit log): printable ASCII")
    scopes: list[ScopeName] = Field(min_length=1, max_length=3,
                                    description="admin includes operate, operate includes read")
    expires_in_days: int | None = Field(None, ge=1, le=3650, description="Lifetime in days; null: until revoked")


class TokenOut(BaseModel):
    """An admin token as listed: never its plaintext or digest."""

    model_config = ConfigDict(json_schema_extra={"examples": [_TOKEN_EXAMPLE]})

    id: str
    name: str
    scopes: list[ScopeName]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    state: Literal["active", "expired", "revoked"]

    @classmethod
    def of(cls, t: AdminToken, now: datetime) -> TokenOut:
        state: Literal["active", "expired", "revoked"] = (
            "revoked" if t.revoked_at is not None else
            "expired" if t.expires_at is not None and t.expires_at <= now else "active")
        return cls(id=t.id, name=t.name, scopes=sorted(s.value for s in t.scopes), created_by=t.created_by,
                   created_at=t.created_at, expires_at=t.expires_at, revoked_at=t.revoked_at,
                   last_used_at=t.last_used_at, state=state)


class IssuedTokenOut(TokenOut):
    """A new token: ``token`` is the plaintext, shown this once and stored nowhere."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {**_TOKEN_EXAMPLE, "token": "mlecs_at_q3Vx0...", "last_used_at": None}]})

    token: str


class AuditEntryOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": 42, "at": "2026-01-06T14:05:00Z", "actor_id": "3f1c9a0e5b7d4c2a9e8f6b1d0c3a5e7f",
         "actor_name": "ci-deployer", "action": "rounds.launch", "method": "POST",
         "path": "/v1/federations/demo/rounds", "status": 409, "outcome": "refused",
         "detail": "round 3 is still open; wait for it to finish"}]})

    id: int
    at: datetime
    actor_id: str | None = Field(description="The token's id; null for a caller without a known token")
    actor_name: str = Field(description="The token's name, or 'anonymous'")
    action: str = Field(description="The operation, e.g. federations.stop; 'unknown' for a path no operation serves")
    method: str
    path: str
    status: int
    outcome: Literal["ok", "refused", "error"]
    detail: str | None

    @classmethod
    def of(cls, e: AuditEntry) -> AuditEntryOut:
        assert e.id is not None  # entries read back from the store always carry their id
        return cls(id=e.id, at=e.at, actor_id=e.actor_id, actor_name=e.actor_name, action=e.action, method=e.method,
                   path=e.path, status=e.status, outcome=e.outcome.value, detail=e.detail)
