"""Creating, listing, pausing and stopping federations, and choosing their current global version.

Every federation starts with global version 0. The current version is what the next round starts from (its
``base_version_id``) and what devices download; promoting an older one is a roll-back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np

from mlecs.codec import CodecKind, encode_tensors, sha256_hex
from server.domain.errors import ConflictError, InvalidRequestError, NotFoundError
from server.domain.federation_config import FederationConfig
from server.domain.models import BlobRef, Federation, FederationState, ModelVersion
from server.learning.anchors import encoded_text_anchors
from server.learning.global_model import check_cloud_model, initial_global_state
from server.services.context import ServiceContext

log = logging.getLogger(__name__)

# Global versions are stored losslessly: quantisation error would otherwise accumulate round by round.
GLOBAL_CODEC = CodecKind.FP32


def with_task(config: FederationConfig) -> FederationConfig:
    """The config with its task resolved: a built-in name becomes that file's text (frozen with the federation),
    and the model reads the task's modalities and classes. Raises InvalidRequestError naming the problem."""
    if config.task is None:
        return config
    from mlecs.tasks import TaskError, builtin_task_text, parse_task

    text = builtin_task_text(config.task.strip()) or config.task
    try:
        task = parse_task(text, "task")
    except TaskError as exc:
        raise InvalidRequestError(str(exc)) from exc
    derived = task.edge_model_config().to_dict()
    for part in ("model", "cloud_model"):
        given = getattr(config, part)
        if given is None:
            continue
        clash = sorted(key for key in ("inputs", "num_classes") if key in given and given[key] != derived[key])
        if clash:
            raise InvalidRequestError(f"{part}.{clash[0]} comes from the task; leave it out")
    cloud = None if config.cloud_model is None else {**derived, **config.cloud_model}
    try:  # the config is checked again with the task's model: e.g. eligible sets naming another task's modality
        return replace(config, task=text, model={**derived, **config.model}, cloud_model=cloud)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc


class FederationService:
    def __init__(self, ctx: ServiceContext, on_change: Callable[[], None] = lambda: None) -> None:
        self._ctx = ctx
        self._on_change = on_change  # told when devices must hear something new: paused, resumed, stopped

    def create(self, name: str, config: FederationConfig) -> Federation:
        """Creates a federation and its initial global version (round 0), evaluated on the test split."""
        name = name.strip()
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise InvalidRequestError("federation name must be 1-64 characters of letters, digits, '-', '_' or '.'")
        store = self._ctx.store
        if store.find_federation_by_name(name) is not None:
            raise ConflictError(f"a federation named {name!r} already exists")
        config = with_task(config)
        try:
            tensors = initial_global_state(config.model, config.seed)
            check_cloud_model(config.model, config.cloud_model)
        except ValueError as exc:
            raise InvalidRequestError(f"invalid model configuration: {exc}") from exc
        federation = Federation(name=name, config=config)
        version = self.store_version(federation.id, 0, tensors, encoded_text_anchors(config))
        if config.server_learning:
            version.metrics = self._ctx.evaluator.evaluate(config, tensors)
        store.add_federation(federation)
        store.add_version(version)
        federation.current_version_id = version.id
        store.save_federation(federation)
        log.info("federation %s created (initial accuracy %.3f)", name, version.metrics.get("accuracy", 0.0))
        return federation

    def store_version(self, federation_id: str, round_number: int, tensors: Mapping[str, np.ndarray],
                      anchors: bytes | None) -> ModelVersion:
        """Stores a global adapter and its anchors content-addressed; returns the (unsaved) version record.

        Version 0 carries the text anchors alone (and counts them as generated, for the versions after it);
        later versions get theirs from ``CloudWork.prepare`` (``anchors`` None).
        """
        data = encode_tensors(tensors, GLOBAL_CODEC)
        if anchors is None:
            return ModelVersion(federation_id=federation_id, round_number=round_number, codec=GLOBAL_CODEC.value,
                                adapter_key=self._ctx.blobs.put(data), adapter_sha256=sha256_hex(data),
                                adapter_size=len(data))
        anchors_ref = BlobRef(self._ctx.blobs.put(anchors), sha256_hex(anchors), len(anchors))
        return ModelVersion(
            federation_id=federation_id,
            round_number=round_number,
            codec=GLOBAL_CODEC.value,
            adapter_key=self._ctx.blobs.put(data),
            adapter_sha256=sha256_hex(data),
            adapter_size=len(data),
            anchors_key=anchors_ref.key,  # content-addressed: identical anchor sets stored once
            anchors_sha256=anchors_ref.sha256,
            anchors_size=anchors_ref.size,
            generated_anchors=anchors_ref,
        )

    def get(self, federation_id_or_name: str) -> Federation:
        """Looks a federation up by id or, failing that, by name."""
        store = self._ctx.store
        try:
            return store.get_federation(federation_id_or_name)
        except NotFoundError:
            found = store.find_federation_by_name(federation_id_or_name)
            if found is None:
                raise NotFoundError(f"federation {federation_id_or_name!r} not found") from None
            return found

    def list_all(self) -> list[Federation]:
        return self._ctx.store.list_federations()

    def stop(self, federation_id_or_name: str) -> Federation:
        """Stops a federation: devices are told to stop; unfinished rounds are failed."""
        federation = self.get(federation_id_or_name)
        if federation.state.is_final:
            return federation
        stopped = self._ctx.store.set_federation_state(federation.id, FederationState.STOPPED)
        self._on_change()
        return stopped

    def pause(self, federation_id_or_name: str) -> Federation:
        """No new rounds open (launched or scheduled) and devices are told to wait; a round already open
        keeps its deadline. Pausing a paused federation changes nothing; a stopped one cannot be paused."""
        return self._set_state(federation_id_or_name, FederationState.PAUSED)

    def resume(self, federation_id_or_name: str) -> Federation:
        """Undoes ``pause``; resuming an active federation changes nothing."""
        return self._set_state(federation_id_or_name, FederationState.ACTIVE)

    def _set_state(self, federation_id_or_name: str, state: FederationState) -> Federation:
        federation = self.get(federation_id_or_name)
        if federation.state.is_final:
            raise ConflictError(f"federation {federation.name!r} is {federation.state} for good; create a new one")
        if federation.state is state:
            return federation
        # The state column alone: a round committing meanwhile keeps the current version it sets.
        changed = self._ctx.store.set_federation_state(federation.id, state)
        self._on_change()
        return changed

    def promote(self, federation_id_or_name: str, version_id: str) -> tuple[Federation, str | None]:
        """Makes one of the federation's versions the current one (newer: promote, older: roll back); the
        next round starts from it. Returns the federation and the version that was current before.

        Refused while a round is unfinished: its commit would replace the choice with a version built from
        the old base. Pause the federation and let the round close first.
        """
        federation = self.get(federation_id_or_name)
        store = self._ctx.store
        try:
            version = store.get_version(version_id)
        except NotFoundError:
            raise NotFoundError(f"version {version_id!r} not found") from None
        if version.federation_id != federation.id:
            raise InvalidRequestError(f"version {version_id} belongs to another federation, not {federation.name!r}")
        latest = store.latest_round(federation.id)
        if latest is not None and not latest.state.is_terminal:
            raise ConflictError(f"round {latest.number} is still {latest.state}; pause the federation and wait for "
                                "the round to close before changing the current version")
        previous = federation.current_version_id
        if previous != version.id:
            federation = store.set_current_version(federation.id, version.id)  # a pause meanwhile stays paused
            log.info("federation %s: current version %s -> %s (round %d)", federation.name, previous, version.id,
                     version.round_number)
        return federation, previous
