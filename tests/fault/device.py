"""A device process for the fault tests: the agent's wire client and durable upload state, no torch.

It "trains" by drawing a small random delta (so many devices and rounds stay cheap), keeps the encoded
update on disk before the first byte leaves, resumes it after a restart, and appends one line to its
journal for every reply that settled an update: what the coordinator *told* it. The tests then check
the database against these journals.

    python -m tests.fault.device --coordinator ADDR --federation F --name N --modalities image,audio \
        --state-dir DIR --journal FILE [--train-s 0.3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from edge_agent.client import CoordinatorClient
from edge_agent.errors import CoordinatorUnavailable, CredentialRejected, RequestRefused
from edge_agent.state import AgentState, Identity, PendingUpload
from edge_agent.tasks import Stop, TrainTask, UploadRequest, Wait
from mlecs.codec import decode_tensors, encode_tensors, sha256_hex
from mlecs.tensor_names import device_may_send

log = logging.getLogger("fault-device")
T = TypeVar("T")


class Device:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.modalities = sorted(args.modalities.split(","))
        self.client = CoordinatorClient(args.coordinator, timeout_s=10)
        self.state = AgentState(Path(args.state_dir))
        self.journal = Path(args.journal)
        self.rng = np.random.default_rng(abs(hash(args.name)) % 2**32)
        self.stop = threading.Event()
        self.device_id = ""

    def retry(self, call: Callable[[], T]) -> T:
        delay = 0.2
        while True:
            try:
                return call()
            except CoordinatorUnavailable as exc:
                log.info("unavailable (%s); retrying", exc)
                # As the agent does: the wait ends early when the connection comes back (a restart).
                self.client.wait_until_reachable(delay * random.uniform(0.5, 1.5), self.stop)
                delay = min(delay * 2, 2.0)

    def record(self, event: str, round_id: str, upload_id: str, detail: str = "") -> None:
        line = json.dumps({"event": event, "device": self.args.name, "device_id": self.device_id,
                           "round_id": round_id, "upload_id": upload_id, "detail": detail})
        with open(self.journal, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def enrol(self) -> None:
        identity = self.state.load_identity(self.args.coordinator, self.args.federation)
        if identity is None:
            device_id, secret, _ = self.retry(
                lambda: self.client.enrol(self.args.federation, self.args.name, self.modalities))
            identity = Identity(self.args.coordinator, self.args.federation, device_id, secret)
            self.state.save_identity(identity)
        self.device_id = identity.device_id
        self.client.authenticate(identity.device_id, identity.device_secret)

    def heartbeats(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.client.heartbeat(self.device_id)
            except (CoordinatorUnavailable, CredentialRejected, RequestRefused) as exc:
                log.debug("heartbeat failed: %s", exc)

    def run(self) -> None:
        self.enrol()
        threading.Thread(target=self.heartbeats, daemon=True).start()
        while True:
            pending = self.state.load_pending()
            if pending is not None:
                self.upload(*pending)
                continue
            task = self.retry(lambda: self.client.get_task(self.device_id))
            if isinstance(task, Stop):
                return
            if isinstance(task, Wait):
                time.sleep(0.2)
                continue
            self.train(task)

    def train(self, task: TrainTask) -> None:
        version = self.retry(lambda: self.client.download_global(self.device_id, task.version_id))
        held = set(self.modalities)
        delta = {name: self.rng.normal(0, 1e-3, value.shape).astype(np.float32)
                 for name, value in decode_tensors(version.adapter).items() if device_may_send(name, held)}
        payload = encode_tensors(delta, task.upload_codec)
        time.sleep(self.args.train_s * random.uniform(0.5, 1.5))
        pending = PendingUpload(round_id=task.round_id, upload_id=uuid.uuid4().hex,
                                base_version_id=version.version_id, codec=task.upload_codec,
                                sha256=sha256_hex(payload), size=len(payload), public_samples=10,
                                private_samples=10, metrics={"chunk_bytes": float(task.max_chunk_bytes)})
        self.state.save_pending(pending, payload)

    def upload(self, pending: PendingUpload, payload: bytes) -> None:
        request = UploadRequest(
            round_id=pending.round_id, device_id=self.device_id, upload_id=pending.upload_id, codec=pending.codec,
            sha256=pending.sha256, modalities=self.modalities, public_samples=pending.public_samples,
            private_samples=pending.private_samples, base_version_id=pending.base_version_id, metrics={})
        chunk = int(pending.metrics["chunk_bytes"])
        try:
            _, offset = self.retry(lambda: self.client.upload_status(self.device_id, pending.round_id,
                                                                     pending.upload_id))
            while True:
                state, offset = self.retry(lambda off=offset: self.client.upload(request, payload, off, chunk))  # type: ignore[misc]
                if state in ("accepted", "rejected"):
                    self.record(state, pending.round_id, pending.upload_id)
                    break
        except RequestRefused as exc:
            self.record("refused", pending.round_id, pending.upload_id, str(exc))
        self.state.clear_pending()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--federation", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--modalities", default="audio,image")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--train-s", type=float, default=0.3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(levelname)s %(message)s")
    Device(args).run()
    log.info("told to stop")


if __name__ == "__main__":
    main()
