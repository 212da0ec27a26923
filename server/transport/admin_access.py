"""Who may call the admin API, and the record of what they did.

* ``Reader``, ``Operator``, ``Administrator``: dependencies that admit a request only with an admin bearer
  token granting that scope (``Authorization: Bearer mlecs_at_...``), reading the token on every request so
  revocation and expiry apply at once. They raise the domain errors; ``admin_api`` maps them once (401 with
  ``WWW-Authenticate``, 403 naming the scope needed). An admitted request naming a query parameter the
  operation does not take is refused (422).
* ``AuditMiddleware``: every /v1 request that is not a GET or HEAD, refused ones included, is written to the
  audit log before its response starts, so an action is never acknowledged without its entry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from starlette.routing import Match

from server.domain.errors import InvalidRequestError, UnauthenticatedError
from server.domain.models import AdminScope, AdminToken

if TYPE_CHECKING:
    from server.services.admin_tokens import AdminTokenService
    from server.services.audit import AuditService

log = logging.getLogger(__name__)

REALM = "mlecs-admin"
_ACTOR = "audit_actor"    # request.state keys the middleware reads back
_DETAIL = "audit_detail"
_AUDITED_PREFIX = "/v1/"
_NOT_AUDITED = frozenset({"GET", "HEAD"})

# Declares the scheme in the OpenAPI document (and /docs' "Authorize" button); the header is parsed below so
# that a malformed one gets its own message.
_bearer = HTTPBearer(auto_error=False, bearerFormat="mlecs_at_...",
                     description="An admin token from `mlecs-coordinator tokens create` or POST /v1/tokens")


def note(request: Request, detail: str) -> None:
    """Adds ``detail`` to the audit entry of this request (what changed, or why it was refused)."""
    setattr(request.state, _DETAIL, detail)


def _presented(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise UnauthenticatedError("missing admin token: send 'Authorization: Bearer <token>' (create the first one "
                                   "with `mlecs-coordinator tokens create`)")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise UnauthenticatedError("the Authorization header must be 'Bearer <admin token>'")
    return credentials.strip()


def _require(scope: AdminScope) -> Callable[..., Awaitable[AdminToken]]:
    async def admit(request: Request, _: Annotated[Any, Depends(_bearer)]) -> AdminToken:
        tokens: AdminTokenService = request.app.state.services.tokens
        plaintext = _presented(request)
        token = await asyncio.to_thread(tokens.identify, plaintext)
        setattr(request.state, _ACTOR, token)  # named in the audit entry even when refused below
        admitted = await asyncio.to_thread(tokens.check, token, scope)
        _refuse_unknown_query(request)
        return admitted

    return admit


def _refuse_unknown_query(request: Request) -> None:
    """A misspelt filter (``?acter=``) would otherwise be ignored and the answer silently unfiltered."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = _query_names(dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise InvalidRequestError(f"unknown query parameter(s) {', '.join(map(repr, unknown))}; this operation "
                                  f"takes: {allowed}")


def _query_names(dependant: Any) -> set[str]:
    """The query parameters an operation declares, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


Reader = Annotated[AdminToken, Depends(_require(AdminScope.READ))]
Operator = Annotated[AdminToken, Depends(_require(AdminScope.OPERATE))]
Administrator = Annotated[AdminToken, Depends(_require(AdminScope.ADMIN))]


def www_authenticate(request: Request, insufficient_scope: str | None = None) -> str:
    """The ``WWW-Authenticate`` value for a refused request (RFC 6750: no error code when no token was sent)."""
    if insufficient_scope is not None:
        return f'Bearer realm="{REALM}", error="insufficient_scope", scope="{insufficient_scope}"'
    if not request.headers.get("authorization"):
        return f'Bearer realm="{REALM}"'
    return f'Bearer realm="{REALM}", error="invalid_token"'


class AuditMiddleware:
    """Pure ASGI middleware (it must see refusals raised before any endpoint runs, and 500s)."""

    def __init__(self, app: Any, audit: Callable[[], AuditService]) -> None:
        self.app = app
        self._audit = audit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in _NOT_AUDITED or not scope["path"].startswith(_AUDITED_PREFIX):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        recorded = False

        async def send_after_recording(message: dict[str, Any]) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                await self._record(scope, state, message["status"], state.get(_DETAIL))
            await send(message)

        try:
            await self.app(scope, receive, send_after_recording)
        except Exception as exc:  # the outer error middleware answers 500 after this
            if not recorded:
                await self._record(scope, state, 500, f"internal error: {type(exc).__name__}")
            raise

    async def _record(self, scope: dict[str, Any], state: dict[str, Any], status: int, detail: str | None) -> None:
        try:
            await asyncio.to_thread(self._audit().record, actor=state.get(_ACTOR), action=_action(scope),
                                    method=scope["method"], path=scope["path"], status=status, detail=detail)
        except Exception:  # the action itself already happened (or was refused); say loudly that its entry is lost
            log.exception("could not write the audit entry for %s %s (status %d)", scope["method"], scope["path"],
                          status)


def _action(scope: dict[str, Any]) -> str:
    """The name of the operation the request reached (``federations.stop``), or ``unknown``."""
    route = scope.get("route")
    if route is None:
        return "unknown"
    match, _ = route.matches(scope)
    name = getattr(route, "name", None)
    return name if match is Match.FULL and isinstance(name, str) and "." in name else "unknown"
