"""A minimal client for the coordinator's admin API (stdlib only, so the CLI stays light).

Every /v1 call sends ``Authorization: Bearer <token>``; the health probes need none.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class AdminApiError(Exception):
    """The admin API answered with an error status; ``status`` and the problem detail are kept."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class AdminClient:
    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _open(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> tuple[bytes, Any]:
        """Sends one request; returns the body and the response headers. Raises AdminApiError for an error status
        and OSError (urllib.error.URLError) when the coordinator cannot be reached."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        params = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.base_url + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            raw = exc.read().decode(errors="replace")
            try:
                detail = json.loads(raw).get("detail", raw)
            except (ValueError, AttributeError):
                detail = raw
            raise AdminApiError(exc.code, str(detail)) from exc

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        payload, _ = self._open(method, path, body, query)
        return json.loads(payload) if payload else None

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)

    def get_bytes(self, path: str) -> tuple[bytes, dict[str, str]]:
        """A binary answer (a version's adapter) with its headers (lower-cased names)."""
        payload, headers = self._open("GET", path)
        return payload, {k.lower(): v for k, v in headers.items()}

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def healthy(self) -> bool:
        try:
            return bool(self.get("/healthz"))
        except (OSError, AdminApiError):
            return False
