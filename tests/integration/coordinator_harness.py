"""Runs a real coordinator (gRPC + admin API + scheduler) in a background thread for tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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


@contextmanager
def running_coordinator(settings: CoordinatorSettings) -> Iterator[RunningCoordinator]:
    settings = settings.model_copy(update={"grpc_port": 0, "admin_port": free_port()})
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
    admin = httpx.Client(base_url=f"http://127.0.0.1:{settings.admin_port}", timeout=60)
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
    try:
        yield RunningCoordinator(coordinator, f"127.0.0.1:{coordinator.grpc_port}", admin)
    finally:
        loop.call_soon_threadsafe(coordinator.shutdown)
        thread.join(timeout=30)
        admin.close()


def wait_for_round(admin: httpx.Client, round_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = admin.get(f"/v1/rounds/{round_id}").json()
        if body["state"] in ("committed", "failed"):
            return dict(body)
        if time.monotonic() > deadline:
            raise TimeoutError(f"round still {body['state']} after {timeout_s} s")
        time.sleep(0.2)
