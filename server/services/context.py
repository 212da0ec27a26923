"""What every service shares: the ports and the settings, wired once by the composition root."""

from __future__ import annotations

from dataclasses import dataclass

from server.config import CoordinatorSettings
from server.domain.ports import BlobStore, PresenceStore, RevocationFeed, Store
from server.learning.anchors import CloudTuner
from server.learning.global_model import GlobalEvaluator


@dataclass(frozen=True)
class ServiceContext:
    settings: CoordinatorSettings
    store: Store
    blobs: BlobStore
    presence: PresenceStore
    evaluator: GlobalEvaluator
    cloud: CloudTuner
    revocations: RevocationFeed
