"""Runs a real coordinator (gRPC + admin API + scheduler) in a background thread for tests.

``c.admin`` is an httpx client that sends an admin-scope token (bootstrapped through the same service as
``mlecs-coordinator tokens create``); ``c.token_for(...)`` issues other tokens and ``c.client(token)`` makes
a client that sends one (or none).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import httpx

from server.app import Coordinator
from server.config import CoordinatorSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningCoordinator:
    coordinator: Coordinator
    grpc_address: str
    admin: httpx.Client
    admin_token: str = ""
    _clients: list[httpx.Client] = field(default_factory=list)

    def token_for(self, *scopes: str, name: str = "test", expires_in: timedelta | None = None) -> str:
        """A new admin token's plaintext with these scopes (read, operate, admin)."""
        services = self.coordinator.services
        assert services is not None
        return services.admin_tokens.create(name, scopes, expires_in, "tests").plaintext

    def client(self, token: str | None) -> httpx.Client:
        """An admin API client sending ``token`` as its bearer token (None: no Authorization header)."""
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        client = httpx.Client(base_url=str(self.admin.base_url), timeout=60, headers=headers)
        self._clients.append(client)
        return client


@contextmanager
def running_coordinator(settings: CoordinatorSettings) -> Iterator[RunningCoordinator]:
    update: dict[str, object] = {"grpc_port": 0, "admin_port": free_port()}
    if not settings.tls_enabled:
        # The explicit development mode (plaintext device port, enrolment without tokens), unless the test
        # passes TLS settings or sets either flag itself.
        update.update({key: True for key in ("allow_plaintext", "open_enrolment")
                       if key not in settings.model_fields_set})
    settings = settings.model_copy(update=update)
    coordinator = Coordinator(settings)
    loop = asyncio.new_event_loop()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            loop.run_until_complete(coordinator.run())
        except BaseException as exc:  # surfaced to the test below
            failure.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    # HTTPS when the test configures it; the harness does not check the certificate (the test does, with its CA).
    scheme = "https" if settings.admin_tls_enabled else "http"
    admin = httpx.Client(base_url=f"{scheme}://127.0.0.1:{settings.admin_port}", timeout=60,
                         verify=not settings.admin_tls_enabled)
    deadline = time.monotonic() + 60
    while True:
        if failure:
            raise RuntimeError("coordinator failed to start") from failure[0]
        try:
            if coordinator.grpc_port and admin.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("coordinator did not start within 60 s")
        time.sleep(0.1)
    assert coordinator.services is not None
    token = coordinator.services.admin_tokens.create("harness", ["admin"], None, "tests").plaintext
    admin.headers["Authorization"] = f"Bearer {token}"
    running = RunningCoordinator(coordinator, f"127.0.0.1:{coordinator.grpc_port}", admin, token)
    try:
        yield running
    finally:
        loop.call_soon_threadsafe(coordinator.shutdown)
        thread.join(timeout=30)
        admin.close()
        for client in running._clients:
            client.close()


def wait_for_round(admin: httpx.Client, round_id: str, timeout_s: float = 60, *, evaluated: bool = True) -> dict:
    """The round once it committed or failed and, with ``evaluated``, once its version's cloud work (the
    evaluation that fills ``global_accuracy``) is no longer pending."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = admin.get(f"/v1/rounds/{round_id}").json()
        if body["state"] == "failed" or (body["state"] == "committed" and not evaluated):
            return dict(body)
        if body["state"] == "committed":
            version = admin.get(f"/v1/versions/{body['version_id']}").json()
            if version["cloud_state"] != "pending":
                return dict(admin.get(f"/v1/rounds/{round_id}").json())
        if time.monotonic() > deadline:
            raise TimeoutError(f"round still {body['state']} (or its cloud work pending) after {timeout_s} s")
        time.sleep(0.2)
