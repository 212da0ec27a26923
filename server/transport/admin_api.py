"""The admin REST API (FastAPI): federations, rounds, devices, versions, health and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.domain.errors import (
    ConflictError,
    CoordinatorError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from server.services.devices import DeviceService
from server.services.federations import FederationService
from server.services.rounds import RoundService
from server.services.versions import VersionService
from server.transport.admin_schemas import (
    CreateFederationBody,
    DeviceOut,
    FederationOut,
    RoundOut,
    VersionOut,
)

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


def _services(request: Request) -> AdminServices:
    services: AdminServices = request.app.state.services
    return services


Services = Annotated[AdminServices, Depends(_services)]


def create_admin_app(services: AdminServices) -> FastAPI:
    app = FastAPI(title="mlecs coordinator admin API", version="1",
                  description="Create federations, launch rounds, watch devices and fetch global versions.")
    app.state.services = services

    @app.exception_handler(CoordinatorError)
    async def _problem(request: Request, exc: CoordinatorError) -> JSONResponse:
        code = next((c for cls, c in _HTTP_STATUS if isinstance(exc, cls)), 500)
        return JSONResponse(status_code=code, media_type="application/problem+json",
                            content={"type": "about:blank", "title": type(exc).__name__, "status": code,
                                     "detail": str(exc), "retryable": exc.retryable})

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

    @app.post("/v1/federations", status_code=status.HTTP_201_CREATED, tags=["federations"])
    async def create_federation(body: CreateFederationBody, s: Services) -> FederationOut:
        """Creates a federation and its initial global version (round 0)."""
        federation = await asyncio.to_thread(s.federations.create, body.name, body.config.to_domain())
        return FederationOut.of(federation)

    @app.get("/v1/federations", tags=["federations"])
    async def list_federations(s: Services) -> list[FederationOut]:
        return [FederationOut.of(f) for f in await asyncio.to_thread(s.federations.list_all)]

    @app.get("/v1/federations/{federation}", tags=["federations"])
    async def get_federation(federation: str, s: Services) -> FederationOut:
        """A federation by id or name."""
        return FederationOut.of(await asyncio.to_thread(s.federations.get, federation))

    @app.post("/v1/federations/{federation}/stop", tags=["federations"])
    async def stop_federation(federation: str, s: Services) -> FederationOut:
        """Stops a federation: its devices are told to stop and an unfinished round fails."""
        return FederationOut.of(await asyncio.to_thread(s.federations.stop, federation))

    @app.post("/v1/federations/{federation}/rounds", status_code=status.HTTP_201_CREATED, tags=["rounds"])
    async def start_round(federation: str, s: Services) -> RoundOut:
        """Launches the next round with the live devices."""
        return RoundOut.of(await asyncio.to_thread(s.rounds.start, federation))

    @app.get("/v1/federations/{federation}/rounds", tags=["rounds"])
    async def list_rounds(federation: str, s: Services) -> list[RoundOut]:
        return [RoundOut.of(r) for r in await asyncio.to_thread(s.rounds.list_for, federation)]

    @app.get("/v1/rounds/{round_id}", tags=["rounds"])
    async def get_round(round_id: str, s: Services) -> RoundOut:
        return RoundOut.of(await asyncio.to_thread(s.rounds.get, round_id))

    @app.get("/v1/federations/{federation}/devices", tags=["devices"])
    async def list_devices(federation: str, s: Services) -> list[DeviceOut]:
        views = await asyncio.to_thread(s.devices.list_for, federation)
        return [DeviceOut.of(v.device, v.online) for v in views]

    @app.get("/v1/federations/{federation}/versions", tags=["versions"])
    async def list_versions(federation: str, s: Services) -> list[VersionOut]:
        return [VersionOut.of(v) for v in await asyncio.to_thread(s.versions.list_for, federation)]

    @app.get("/v1/versions/{version_id}", tags=["versions"])
    async def get_version(version_id: str, s: Services) -> VersionOut:
        return VersionOut.of(await asyncio.to_thread(s.versions.get, version_id))

    @app.get("/v1/versions/{version_id}/adapter", tags=["versions"],
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def download_adapter(version_id: str, s: Services) -> Response:
        """The encoded global adapter (mlecs codec); its sha256 is in the X-Checksum-Sha256 header."""
        version = await asyncio.to_thread(s.versions.get, version_id)
        _, adapter, _ = await asyncio.to_thread(s.versions.read, version.id, version.federation_id)
        return Response(adapter, media_type="application/octet-stream",
                        headers={"X-Checksum-Sha256": version.adapter_sha256,
                                 "Content-Disposition": f'attachment; filename="adapter-{version.id}.mlecs"'})

    return app
