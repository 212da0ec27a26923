"""The coordinator's error tree. Transport layers map these to gRPC / HTTP statuses once.

    CoordinatorError
    ├── NotFoundError            a federation, device, round, upload or version does not exist
    ├── ConflictError            the request contradicts current state (duplicate name, closed round)
    │   ├── InvalidTransitionError   a round state change the lifecycle does not allow
    │   ├── LateUpdateError          an upload for a round that already closed (a straggler)
    │   └── LeaseLostError           a replica's lease passed to another replica; its write was refused
    ├── InvalidRequestError      malformed or inconsistent input (names what is wrong)
    │   ├── MalformedRequestError    bytes that are not the message the method takes
    │   └── UpdateRejectedError  an upload failed validation (size, checksum, schema, values)
    ├── UnauthenticatedError     missing or wrong device credential or admin token (expired, revoked)
    ├── PermissionDeniedError    a device acting outside its own identity, or revoked
    │   └── InsufficientScopeError   an admin token without the scope an operation needs
    ├── UnavailableError         the database, Redis or blob store is down (retryable)
    ├── IdleStreamError          a stream sent nothing for too long (retryable)
    └── RateLimitedError         a device sent requests faster than its rate limit (retryable later)
        └── ResourceLimitError   a device (or everyone) holds as many streams or staged bytes as allowed

Each class says whether retrying the same request can help (``retryable``).
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base of every error the coordinator raises on purpose."""

    retryable: bool = False


class NotFoundError(CoordinatorError):
    """The named object does not exist."""


class ConflictError(CoordinatorError):
    """The request conflicts with the current state."""


class InvalidTransitionError(ConflictError):
    """A round lifecycle transition that is not allowed."""


class LateUpdateError(ConflictError):
    """An update arrived after its round closed: the round committed or failed without it."""


class AlreadyAcceptedError(ConflictError):
    """The device already has an update accepted in the round: a round counts one update per device."""


class LeaseLostError(ConflictError):
    """The fencing token presented is no longer current: another replica took over the work."""


class InvalidRequestError(CoordinatorError):
    """The request is malformed or inconsistent."""


class MalformedRequestError(InvalidRequestError):
    """The bytes a caller sent do not decode as the message the method takes."""


class UpdateRejectedError(InvalidRequestError):
    """An uploaded update failed validation; ``reason`` is a short, bounded code for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"update rejected ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


class UnauthenticatedError(CoordinatorError):
    """The caller did not prove who it is."""


class PermissionDeniedError(CoordinatorError):
    """The caller is known but may not do this."""


class InsufficientScopeError(PermissionDeniedError):
    """A valid admin token whose scopes do not include the one the operation needs (``scope``)."""

    def __init__(self, scope: str, detail: str) -> None:
        super().__init__(detail)
        self.scope = scope


class UnavailableError(CoordinatorError):
    """A dependency (database, Redis, blob store) is unavailable; retry later."""

    retryable = True


class IdleStreamError(CoordinatorError):
    """A client stream sent no message within the idle timeout; it was closed (resume it)."""

    retryable = True


class RateLimitedError(CoordinatorError):
    """The caller sent requests faster than its rate limit allows; retry after ``retry_after_s``."""

    retryable = True

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class ResourceLimitError(RateLimitedError):
    """The caller (or every caller together) holds as much of a bounded resource as allowed: upload streams,
    staged bytes. ``reason`` is a short code for metrics."""

    def __init__(self, reason: str, detail: str, retry_after_s: float) -> None:
        super().__init__(detail, retry_after_s)
        self.reason = reason
