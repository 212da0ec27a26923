"""Remembered device credentials are renewed in batches: one database read renews the live ones and drops
those revoked, re-enrolled or deleted meanwhile."""

from __future__ import annotations

from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import running_coordinator


def test_one_batched_refresh_renews_live_credentials_and_drops_revoked_ones(tmp_path):
    with running_coordinator(CoordinatorSettings(state_dir=tmp_path)) as c:
        assert c.admin.post("/v1/federations", json={"name": "f", "config": {
            "model": {"backbone": "tiny"}, "server_learning": False}}).status_code == 201
        services = c.coordinator.services
        assert services is not None
        devices = services.devices
        live = devices.enrol("f", "live", ["image"])
        revoked = devices.enrol("f", "revoked", ["audio"])
        for enrolment in (live, revoked):
            devices.authenticate(enrolment.device.id, enrolment.secret)  # remembered from now on
        # Revoked in the database by another replica; this one has not heard (no revocation feed here).
        services.ctx.store.revoke_device(revoked.device.id)
        assert devices.authenticate_cached(revoked.device.id, revoked.secret) is not None

        devices.refresh_credentials({live.device.id, revoked.device.id, "deleted-meanwhile"})

        assert devices.authenticate_cached(live.device.id, live.secret) == services.ctx.store.get_device(live.device.id)
        assert devices.authenticate_cached(revoked.device.id, revoked.secret) is None  # its next call reads
