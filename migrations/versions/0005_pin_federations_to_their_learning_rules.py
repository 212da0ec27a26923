"""Pins federations created before private-data AMT to the rules they were created under.

Two defaults changed in the code, not in the schema: a device's update is now learned on its private
data (``upload_stage = "private"``), and the model's head reads ``z`` beside the backbone
(``model.fused_skip = true``, which changes the head's shape). A federation that already has versions
keeps running as it was: ``upload_stage = "public"`` and ``fused_skip = false`` are written into its
stored config where the keys are absent, so its stored adapters still load and its devices keep
training the same way. Create a new federation to use the new rules.

The downgrade removes the keys the older code does not know when they hold the older behaviour, so an
older coordinator can read the rows again; a federation created with the new rules keeps them, and the
older code refuses it by name (it cannot run that model).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_federations = sa.table("federations", sa.column("id", sa.String(64)), sa.column("config", sa.JSON()))
_NEW_CONFIG_KEYS = ("upload_stage", "personal_epochs", "cloud_model")


def _rewrite(change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    bind = op.get_bind()
    for row in bind.execute(sa.select(_federations.c.id, _federations.c.config)).all():
        config = dict(row.config or {})
        changed = change(config)
        if changed != config:
            bind.execute(_federations.update().where(_federations.c.id == row.id).values(config=changed))


def _pin(config: dict[str, Any]) -> dict[str, Any]:
    pinned = {**config, "upload_stage": config.get("upload_stage", "public")}
    pinned["model"] = {**dict(config.get("model") or {}), "fused_skip": (config.get("model") or {}).get(
        "fused_skip", False)}
    return pinned


def _unpin(config: dict[str, Any]) -> dict[str, Any]:
    unpinned = dict(config)
    if unpinned.get("upload_stage") == "public":
        for key in _NEW_CONFIG_KEYS:
            unpinned.pop(key, None)
    model = dict(unpinned.get("model") or {})
    if model.get("fused_skip") is False:
        model.pop("fused_skip")
    if "model" in unpinned:
        unpinned["model"] = model
    return unpinned


def upgrade() -> None:
    _rewrite(_pin)


def downgrade() -> None:
    _rewrite(_unpin)
