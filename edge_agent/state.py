"""The agent's durable state on disk: identity, and the update it is uploading (so a restart resumes)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Identity:
    coordinator: str
    federation: str
    device_id: str
    device_secret: str


@dataclass(frozen=True)
class PendingUpload:
    """An encoded update that is not yet acknowledged as accepted."""

    round_id: str
    upload_id: str
    base_version_id: str
    codec: str
    sha256: str
    size: int
    public_samples: int
    private_samples: int
    metrics: dict[str, float]
    fused_sample_ids: list[int] = field(default_factory=list)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AgentState:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # the identity file holds a credential

    @property
    def personal_model_path(self) -> Path:
        return self.root / "personal.pt"

    def load_identity(self, coordinator: str, federation: str) -> Identity | None:
        """The stored identity, if it was issued by this coordinator for this federation."""
        path = self.root / "identity.json"
        if not path.exists():
            return None
        identity = Identity(**json.loads(path.read_text()))
        if (identity.coordinator, identity.federation) != (coordinator, federation):
            return None
        return identity

    def save_identity(self, identity: Identity) -> None:
        _write_atomically(self.root / "identity.json", json.dumps(asdict(identity)).encode())
        os.chmod(self.root / "identity.json", 0o600)

    def forget_identity(self) -> None:
        (self.root / "identity.json").unlink(missing_ok=True)

    def save_pending(self, pending: PendingUpload, payload: bytes) -> None:
        _write_atomically(self.root / "pending.bin", payload)
        _write_atomically(self.root / "pending.json", json.dumps(asdict(pending)).encode())

    def load_pending(self) -> tuple[PendingUpload, bytes] | None:
        meta, payload = self.root / "pending.json", self.root / "pending.bin"
        if not (meta.exists() and payload.exists()):
            return None
        return PendingUpload(**json.loads(meta.read_text())), payload.read_bytes()

    def clear_pending(self) -> None:
        (self.root / "pending.json").unlink(missing_ok=True)
        (self.root / "pending.bin").unlink(missing_ok=True)
