"""What a dependency said when it failed: logged here, never passed on.

Callers (devices, admins) are told that the database or Redis refused or is unavailable, and a reference;
the driver's own text, which can quote the schema, a query, a value or a host, goes to the coordinator's
log under that reference.
"""

from __future__ import annotations

import logging
import uuid

log = logging.getLogger("mlecs.dependencies")


def first_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def logged_cause(exc: BaseException) -> str:
    """Logs ``exc``'s own words under a fresh reference and returns the reference."""
    ref = uuid.uuid4().hex[:12]
    log.warning("dependency error [ref %s]: %s", ref, first_line(exc))
    return ref
