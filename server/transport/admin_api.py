"""The admin REST API (FastAPI): federations, rounds, devices, versions, admin tokens, the audit log, health
and /metrics.

Every /v1 operation needs an admin bearer token granting its scope (``admin_access``): GETs ``read``;
creating, pausing, resuming and stopping federations, launching rounds and issuing enrolment tokens
``operate``; admin tokens, device revocation, version promotion and the audit log ``admin``. Every /v1
request that changes something, or tried to, lands in the audit log. Errors are problem+json
(``Problem``), mapped from the domain error tree once, here; so are FastAPI's own 404, 405 and 422.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BeforeValidator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server.domain.errors import (
    ConflictError,
    CoordinatorError,
    InsufficientScopeError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from server.domain.models import utcnow
from server.services.admin_tokens import AdminTokenService
from server.services.audit import AuditService
from server.services.devices import DeviceService
from server.services.federations import FederationService
from server.services.inspection import RoundInspectionService
from server.services.rounds import RoundService
from server.services.versions import VersionService
from server.transport.access_schemas import AuditEntryOut, CreateTokenBody, IssuedTokenOut, Problem, TokenOut
from server.transport.admin_access import Administrator, AuditMiddleware, Operator, Reader, note, www_authenticate
from server.transport.admin_schemas import (
    CreateEnrolmentTokenBody,
    CreateFederationBody,
    DeviceOut,
    EnrolmentTokenOut,
    FederationOut,
    IssuedEnrolmentTokenOut,
    ParticipantOut,
    RefusalOut,
    RoundMetricsOut,
    RoundOut,
    VersionOut,
)

log = logging.getLogger(__name__)

_HTTP_STATUS: list[tuple[type[CoordinatorError], int]] = [
    (NotFoundError, 404),
    (ConflictError, 409),
    (InvalidRequestError, 422),
    (UnauthenticatedError, 401),
    (PermissionDeniedError, 403),
    (UnavailableError, 503),
]


@dataclass(frozen=True)
class AdminServices:
    federations: FederationService
    rounds: RoundService
    devices: DeviceService
    versions: VersionService
    health: Callable[[], dict[str, bool]]  # {"ready", "database", "presence"}: which dependencies answer
    tokens: AdminTokenService
    audit: AuditService
    inspection: RoundInspectionService


def _services_of(app: FastAPI) -> AdminServices:
    services: AdminServices = app.state.services
    return services


def _services(request: Request) -> AdminServices:
    return _services_of(request.app)


Services = Annotated[AdminServices, Depends(_services)]
Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many, newest first")]
NO_NUL = r"^[^\x00]*$"
"""Ids, names and filters never hold a NUL byte (PostgreSQL text cannot), so one is refused as invalid."""
FederationRef = Annotated[str, Path(description="A federation's id or name", examples=["avmnist-demo"],
                                    pattern=NO_NUL)]
RoundId = Annotated[str, Path(description="A round's id", pattern=NO_NUL)]
VersionId = Annotated[str, Path(description="A global version's id", pattern=NO_NUL)]
DeviceId = Annotated[str, Path(description="A device's id", pattern=NO_NUL)]
TokenId = Annotated[str, Path(description="An admin token's id", pattern=NO_NUL)]


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339(value: object) -> object:
    """Pydantic would also take a number (a Unix time) or a date without a zone; the API promises RFC 3339."""
    if isinstance(value, str) and not _RFC3339.match(value):
        raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2026-01-06T14:05:00Z")
    return value


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem+json answers an operation may give (every /v1 one: 400, 401, 403, 422,
    503)."""
    said = {400: "Malformed request (a body that cannot be read as JSON)",
            401: "No valid admin token (missing, unknown, expired or revoked)",
            403: "The token lacks the scope this operation needs", 404: "Not found",
            409: "Conflicts with the current state", 422: "Invalid request", 503: "The database is unavailable"}
    return {code: {"description": said[code],
                   "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for code in sorted({400, 401, 403, 422, 503, *codes})}


def _problem(code: int, title: str, detail: str, *, retryable: bool = False, headers: Mapping[str, str] | None = None,
             errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body = Problem(title=title, status=code, detail=detail, retryable=retryable, errors=errors)
    return JSONResponse(status_code=code, media_type="application/problem+json", headers=headers,
                        content=body.model_dump(exclude_none=True))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CoordinatorError)
    async def _domain(request: Request, exc: CoordinatorError) -> JSONResponse:
        code = next((c for cls, c in _HTTP_STATUS if isinstance(exc, cls)), 500)
        headers = None
        if isinstance(exc, UnauthenticatedError):
            headers = {"WWW-Authenticate": www_authenticate(request)}
        elif isinstance(exc, InsufficientScopeError):
            headers = {"WWW-Authenticate": www_authenticate(request, exc.scope)}
        note(request, str(exc))
        return _problem(code, type(exc).__name__, str(exc), retryable=exc.retryable, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        detail = "invalid request: " + "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5])
        note(request, detail)
        return _problem(422, "RequestValidationError", detail, errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the caller's fault: the traceback goes to the log under a reference, the caller gets that
        # reference as problem+json (Starlette would answer text/plain "Internal Server Error").
        ref = uuid.uuid4().hex[:12]
        log.error("admin API %s %s failed [ref %s]", request.method, request.url.path, ref, exc_info=exc)
        note(request, f"internal error [ref {ref}]")
        return _problem(500, "InternalError", f"internal error; the coordinator's log has the details [ref {ref}]")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        note(request, str(exc.detail))
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names one route's methods; the resource may have several routes
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return _problem(exc.status_code, "HTTPException", str(exc.detail), headers=headers)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The generated document plus the Problem schema that every error response refers to."""
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = document
        return app.openapi_schema

    return build


def create_admin_app(services: AdminServices) -> FastAPI:
    app = FastAPI(title="mlecs coordinator admin API", version="1",
                  description="Create federations, launch rounds, watch devices and fetch global versions. Every /v1 "
                              "operation needs `Authorization: Bearer <admin token>` with the scope it names.")
    app.state.services = services
    app.add_middleware(AuditMiddleware, audit=lambda: _services_of(app).audit)
    _install_error_handlers(app)
    app.openapi = _openapi(app)  # type: ignore[method-assign]

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process serves requests."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(s: Services) -> JSONResponse:
        """Readiness: the database answers (503 otherwise). `presence` says whether Redis does; without it
        devices are not seen as live, so no new round opens, but uploads and commits go on."""
        health = await asyncio.to_thread(s.health)
        return JSONResponse(status_code=200 if health["ready"] else 503, content=health)

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/federations", status_code=status.HTTP_201_CREATED, tags=["federations"],
              name="federations.create", responses=_problems(409))
    async def create_federation(body: CreateFederationBody, request: Request, s: Services,
                                _: Operator) -> FederationOut:
        """Creates a federation with its full config and its initial global version (round 0). Scope: operate."""
        federation = await asyncio.to_thread(s.federations.create, body.name, body.config.to_domain())
        note(request, f"created federation {federation.name} ({federation.id})")
        return FederationOut.of(federation)

    @app.get("/v1/federations", tags=["federations"], name="federations.list", responses=_problems())
    async def list_federations(s: Services, _: Reader) -> list[FederationOut]:
        """Every federation, oldest first. Scope: read."""
        return [FederationOut.of(f) for f in await asyncio.to_thread(s.federations.list_all)]

    @app.get("/v1/federations/{federation}", tags=["federations"], name="federations.get", responses=_problems(404))
    async def get_federation(federation: FederationRef, s: Services, _: Reader) -> FederationOut:
        """A federation by id or name. Scope: read."""
        return FederationOut.of(await asyncio.to_thread(s.federations.get, federation))

    @app.post("/v1/federations/{federation}/pause", tags=["federations"], name="federations.pause",
              responses=_problems(404, 409))
    async def pause_federation(federation: FederationRef, s: Services, _: Operator) -> FederationOut:
        """Pauses a federation: no new round opens and devices are told to wait; an open round keeps its
        deadline. Pausing again changes nothing; a stopped federation answers 409. Scope: operate."""
        return FederationOut.of(await asyncio.to_thread(s.federations.pause, federation))

    @app.post("/v1/federations/{federation}/resume", tags=["federations"], name="federations.resume",
              responses=_problems(404, 409))
    async def resume_federation(federation: FederationRef, s: Services, _: Operator) -> FederationOut:
        """Resumes a paused federation. Scope: operate."""
        return FederationOut.of(await asyncio.to_thread(s.federations.resume, federation))

    @app.post("/v1/federations/{federation}/stop", tags=["federations"], name="federations.stop",
              responses=_problems(404))
    async def stop_federation(federation: FederationRef, s: Services, _: Operator) -> FederationOut:
        """Stops a federation for good: its devices are told to stop and an unfinished round fails. Scope: operate."""
        return FederationOut.of(await asyncio.to_thread(s.federations.stop, federation))

    @app.post("/v1/federations/{federation}/rounds", status_code=status.HTTP_201_CREATED, tags=["rounds"],
              name="rounds.launch", responses=_problems(404, 409))
    async def start_round(federation: FederationRef, request: Request, s: Services, _: Operator) -> RoundOut:
        """Launches the next round with the live devices (409 says why not: paused, a round still open, too few
        live devices). Scope: operate."""
        round_ = await asyncio.to_thread(s.rounds.start, federation)
        note(request, f"opened round {round_.number} ({round_.id}) with {len(round_.participants)} participant(s)")
        return RoundOut.of(round_)

    @app.get("/v1/federations/{federation}/rounds", tags=["rounds"], name="rounds.list", responses=_problems(404))
    async def list_rounds(federation: FederationRef, s: Services, _: Reader) -> list[RoundOut]:
        """The federation's rounds by number. Scope: read."""
        return [RoundOut.of(r) for r in await asyncio.to_thread(s.rounds.list_for, federation)]

    @app.get("/v1/rounds/{round_id}", tags=["rounds"], name="rounds.get", responses=_problems(404))
    async def get_round(round_id: RoundId, s: Services, _: Reader) -> RoundOut:
        """A round: state, participants, deadline and metrics. Scope: read."""
        return RoundOut.of(await asyncio.to_thread(s.rounds.get, round_id))

    @app.get("/v1/rounds/{round_id}/participants", tags=["rounds"], name="rounds.participants",
             responses=_problems(404))
    async def round_participants(round_id: RoundId, s: Services, _: Reader) -> list[ParticipantOut]:
        """Per device: invited or not, its update's state, when it was accepted or why it was rejected, its
        anchor agreement and what it reported. Scope: read."""
        return [ParticipantOut.of(p) for p in await asyncio.to_thread(s.inspection.participants, round_id)]

    @app.get("/v1/rounds/{round_id}/refusals", tags=["rounds"], name="rounds.refusals", responses=_problems(404))
    async def round_refusals(round_id: RoundId, s: Services, _: Reader, limit: Limit = 100) -> list[RefusalOut]:
        """Device requests refused in this round (invalid updates, rate limits, identity), newest first. Scope: read."""
        return [RefusalOut.of(r) for r in await asyncio.to_thread(s.inspection.refusals, round_id, limit)]

    @app.get("/v1/rounds/{round_id}/metrics", tags=["rounds"], name="rounds.metrics", responses=_problems(404))
    async def round_metrics(round_id: RoundId, s: Services, _: Reader) -> RoundMetricsOut:
        """The round's metrics, its version's evaluation and each device's report. Scope: read."""
        return RoundMetricsOut.of(await asyncio.to_thread(s.inspection.metrics, round_id))

    @app.get("/v1/federations/{federation}/devices", tags=["devices"], name="devices.list", responses=_problems(404))
    async def list_devices(federation: FederationRef, s: Services, _: Reader) -> list[DeviceOut]:
        """The federation's devices with their modality sets, whether they are online, and when last seen.
        Scope: read."""
        views = await asyncio.to_thread(s.devices.list_for, federation)
        return [DeviceOut.of(v.device, v.online) for v in views]

    @app.get("/v1/devices/{device_id}", tags=["devices"], name="devices.get", responses=_problems(404))
    async def get_device(device_id: DeviceId, s: Services, _: Reader) -> DeviceOut:
        """A device by id. Scope: read."""
        view = await asyncio.to_thread(s.devices.view, device_id)
        return DeviceOut.of(view.device, view.online)

    @app.post("/v1/devices/{device_id}/revoke", tags=["devices"], name="devices.revoke", responses=_problems(404))
    async def revoke_device(device_id: DeviceId, s: Services, _: Administrator) -> DeviceOut:
        """Revokes a device: its next call is refused and it cannot enrol again under its name. Revoking it again
        changes nothing. Scope: admin."""
        device = await asyncio.to_thread(s.devices.revoke, device_id)
        return DeviceOut.of(device, online=False)

    @app.post("/v1/federations/{federation}/enrolment-tokens", status_code=status.HTTP_201_CREATED,
              tags=["devices"], name="enrolment_tokens.create", responses=_problems(404, 409))
    async def create_enrolment_token(federation: FederationRef, body: CreateEnrolmentTokenBody, request: Request,
                                     s: Services, actor: Operator) -> IssuedEnrolmentTokenOut:
        """Issues a one-time token a device enrols with (the agent's enrolment_token_file). Its plaintext is in
        this answer only. Scope: operate."""
        plaintext, token = await asyncio.to_thread(s.devices.issue_enrolment_token, federation, body.device_name,
                                                   body.expires_in_hours * 3600.0, f"token:{actor.name} ({actor.id})")
        note(request, f"issued enrolment token {token.id}" + (f" for device {token.device_name}"
                                                               if token.device_name else ""))
        return IssuedEnrolmentTokenOut(**EnrolmentTokenOut.of(token, utcnow()).model_dump(), token=plaintext)

    @app.get("/v1/federations/{federation}/enrolment-tokens", tags=["devices"], name="enrolment_tokens.list",
             responses=_problems(404))
    async def list_enrolment_tokens(federation: FederationRef, s: Services, _: Reader) -> list[EnrolmentTokenOut]:
        """The federation's enrolment tokens and whether each was used; never a plaintext. Scope: read."""
        now = utcnow()
        return [EnrolmentTokenOut.of(t, now) for t in await asyncio.to_thread(s.devices.list_enrolment_tokens,
                                                                             federation)]

    @app.get("/v1/federations/{federation}/versions", tags=["versions"], name="versions.list",
             responses=_problems(404))
    async def list_versions(federation: FederationRef, s: Services, _: Reader) -> list[VersionOut]:
        """The federation's global versions, oldest first, with their evaluation. Scope: read."""
        return [VersionOut.of(v) for v in await asyncio.to_thread(s.versions.list_for, federation)]

    @app.get("/v1/versions/{version_id}", tags=["versions"], name="versions.get", responses=_problems(404))
    async def get_version(version_id: VersionId, s: Services, _: Reader) -> VersionOut:
        """A global version. Scope: read."""
        return VersionOut.of(await asyncio.to_thread(s.versions.get, version_id))

    @app.get("/v1/versions/{version_id}/adapter", tags=["versions"], name="versions.download", response_class=Response,
             responses={**_problems(404), 200: {
                 "description": "The encoded adapter",
                 "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def download_adapter(version_id: VersionId, s: Services, _: Reader) -> Response:
        """The encoded global adapter (mlecs codec); its sha256 is in the X-Checksum-Sha256 header. Scope: read."""
        version = await asyncio.to_thread(s.versions.get, version_id)
        _read, adapter, _anchors = await asyncio.to_thread(s.versions.read, version.id, version.federation_id)
        return Response(adapter, media_type="application/octet-stream",
                        headers={"X-Checksum-Sha256": version.adapter_sha256,
                                 "Content-Disposition": f'attachment; filename="adapter-{version.id}.mlecs"'})

    @app.post("/v1/federations/{federation}/versions/{version_id}/promote", tags=["versions"],
              name="versions.promote", responses=_problems(404, 409))
    async def promote_version(federation: FederationRef, version_id: VersionId, request: Request, s: Services,
                              _: Administrator) -> FederationOut:
        """Makes one of the federation's versions the current one: a newer one (promote) or an older one (roll
        back). The next round starts from it and devices download it. 409 while a round is unfinished. Scope:
        admin."""
        promoted, previous = await asyncio.to_thread(s.federations.promote, federation, version_id)
        note(request, f"federation {promoted.name}: current version {previous} -> {promoted.current_version_id}")
        return FederationOut.of(promoted)

    @app.post("/v1/tokens", status_code=status.HTTP_201_CREATED, tags=["tokens"], name="tokens.create",
              responses=_problems())
    async def create_token(body: CreateTokenBody, request: Request, s: Services,
                           actor: Administrator) -> IssuedTokenOut:
        """Issues an admin token. Its plaintext (``token``) is in this answer only; the coordinator keeps a
        digest. Scope: admin."""
        expires_in = None if body.expires_in_days is None else timedelta(days=body.expires_in_days)
        issued = await asyncio.to_thread(s.tokens.create, body.name, body.scopes, expires_in,
                                         f"token:{actor.name} ({actor.id})")
        note(request, f"issued token {issued.token.id} ({issued.token.name}: {', '.join(body.scopes)})")
        return IssuedTokenOut(**TokenOut.of(issued.token, utcnow()).model_dump(), token=issued.plaintext)

    @app.get("/v1/tokens", tags=["tokens"], name="tokens.list", responses=_problems())
    async def list_tokens(s: Services, _: Administrator) -> list[TokenOut]:
        """Every admin token with its scopes and state; never a plaintext or digest. Scope: admin."""
        now = utcnow()
        return [TokenOut.of(t, now) for t in await asyncio.to_thread(s.tokens.list_all)]

    @app.post("/v1/tokens/{token_id}/revoke", tags=["tokens"], name="tokens.revoke", responses=_problems(404))
    async def revoke_token(token_id: TokenId, s: Services, _: Administrator) -> TokenOut:
        """Revokes a token: its next request is refused (401). Revoking it again changes nothing. Scope: admin."""
        return TokenOut.of(await asyncio.to_thread(s.tokens.revoke, token_id), utcnow())

    @app.get("/v1/audit", tags=["audit"], name="audit.list", responses=_problems())
    async def list_audit(
        s: Services, _: Administrator, limit: Limit = 100,
        actor: Annotated[str | None, Query(max_length=200, pattern=NO_NUL,
                                           description="A token id or name, or 'anonymous'")] = None,
        action: Annotated[str | None, Query(max_length=200, pattern=NO_NUL,
                                            description="An action (rounds.launch) or a group (rounds)")] = None,
        since: Annotated[datetime | None, BeforeValidator(_rfc3339),
                         Query(description="Only entries at or after this time (RFC 3339, with its offset)")] = None,
    ) -> list[AuditEntryOut]:
        """The audit log of admin actions (every /v1 request but GETs, refused ones too), newest first. Scope:
        admin."""
        entries = await asyncio.to_thread(lambda: s.audit.list(actor=actor, action=action, since=since, limit=limit))
        return [AuditEntryOut.of(e) for e in entries]

    return app
