"""The SQL store's record of the cloud work versions owe (``server.domain.ports.CloudWorkStore``)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import or_, select
from sqlalchemy import update as sql_update

from server.domain.models import BlobRef, CloudOutcome, CloudState, ModelVersion, utcnow
from server.domain.ports import CloudWorkStore
from server.persistence import mapping
from server.persistence.sql_base import SqlBase, get_row, rowcount
from server.persistence.tables import ModelVersionRow, RoundRow

_PENDING = CloudState.PENDING.value


class SqlCloudWork(SqlBase):
    """``CloudWorkStore`` on SQLAlchemy."""

    def owed_cloud_work(self, federation_id: str | None = None) -> list[ModelVersion]:
        query = select(ModelVersionRow).where(ModelVersionRow.cloud_state == _PENDING)
        if federation_id is not None:
            query = query.where(ModelVersionRow.federation_id == federation_id)
        with self._transaction() as session:
            rows = session.scalars(query.order_by(ModelVersionRow.created_at, ModelVersionRow.id))
            return [mapping.to_version(row) for row in rows]

    def claim_redelivery(self, version_id: str, at: datetime, queued_before: datetime) -> bool:
        with self._transaction() as session:
            result = session.execute(
                sql_update(ModelVersionRow)
                .where(ModelVersionRow.id == version_id, ModelVersionRow.cloud_state == _PENDING,
                       or_(ModelVersionRow.cloud_enqueued_at.is_(None),
                           ModelVersionRow.cloud_enqueued_at <= queued_before))
                .values(cloud_enqueued_at=at))
            return rowcount(result) == 1

    def touch_cloud_work(self, version_id: str, at: datetime) -> None:
        with self._transaction() as session:
            session.execute(sql_update(ModelVersionRow).where(ModelVersionRow.id == version_id,
                                                              ModelVersionRow.cloud_state == _PENDING)
                            .values(cloud_enqueued_at=at))

    def start_cloud_attempt(self, version_id: str) -> ModelVersion:
        with self._transaction(missing=f"model version {version_id} not found") as session:
            session.execute(sql_update(ModelVersionRow).where(ModelVersionRow.id == version_id,
                                                              ModelVersionRow.cloud_state == _PENDING)
                            .values(cloud_attempts=ModelVersionRow.cloud_attempts + 1, cloud_enqueued_at=utcnow()))
            return mapping.to_version(get_row(session, ModelVersionRow, version_id, "model version"))

    def finish_cloud_work(self, version_id: str, outcome: CloudOutcome) -> bool:
        with self._transaction(missing=f"model version {version_id} not found") as session:
            # Locked, then checked: of two workers finishing the same version, the second writes nothing.
            row = session.scalars(select(ModelVersionRow).where(ModelVersionRow.id == version_id)
                                  .with_for_update()).first()
            if row is None or row.cloud_state != _PENDING:
                return False
            row.cloud_state = outcome.state.value
            row.cloud_finished_at = outcome.finished_at
            row.cloud_error = None if outcome.error is None else outcome.error[:500]
            row.metrics = {**(row.metrics or {}), **mapping.encode_metrics(outcome.version_metrics)}
            generated = outcome.generated_anchors
            if generated is not None:
                row.generated_anchors_key, row.generated_anchors_sha256 = generated.key, generated.sha256
                row.generated_anchors_size = generated.size
            fallback = outcome.anchors_if_unset
            if row.anchors_key is None and fallback is not None:  # a federation waiting for anchors
                row.anchors_key, row.anchors_sha256, row.anchors_size = fallback.key, fallback.sha256, fallback.size
            if outcome.round_metrics:
                for round_row in session.scalars(select(RoundRow).where(RoundRow.version_id == version_id)):
                    round_row.metrics = {**(round_row.metrics or {}), **mapping.encode_metrics(outcome.round_metrics)}
            return True

    def newest_generated_anchors(self, federation_id: str) -> BlobRef | None:
        with self._transaction() as session:
            row = session.execute(
                select(ModelVersionRow.generated_anchors_key, ModelVersionRow.generated_anchors_sha256,
                       ModelVersionRow.generated_anchors_size)
                .where(ModelVersionRow.federation_id == federation_id,
                       ModelVersionRow.generated_anchors_key.is_not(None))
                .order_by(ModelVersionRow.round_number.desc(), ModelVersionRow.created_at.desc()).limit(1)).first()
            return None if row is None or row[0] is None else BlobRef(row[0], row[1] or "", row[2] or 0)


if TYPE_CHECKING:
    _implements_port: type[CloudWorkStore] = SqlCloudWork
