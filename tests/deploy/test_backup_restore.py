"""``deploy/backup.sh`` and ``deploy/restore.sh`` round-trip a real coordinator's PostgreSQL database and blob store.

A coordinator commits one round; it is stopped, backed up, restored into a second fresh database and an empty
blob directory, and a coordinator started on the copy serves every version's adapter with the same sha256.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import running_coordinator, wait_for_round
from tests.integration.test_grpc_loopback import _device, _federation
from tests.integration.test_scheduling_modes import _train, _upload

ROOT = Path(__file__).resolve().parents[2]
BACKUP, RESTORE = ROOT / "deploy" / "backup.sh", ROOT / "deploy" / "restore.sh"

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _row_counts(url: str) -> dict[str, int]:
    with psycopg.connect(_libpq(url)) as connection:
        tables = [row[0] for row in connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")]
        return {table: connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]  # type: ignore[index]
                for table in tables}


def _run(script: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True, timeout=60)


def _settings(state_dir: Path, database_url: str, redis_prefix: str) -> CoordinatorSettings:
    return CoordinatorSettings(state_dir=state_dir, database_url=database_url, redis_url="redis://127.0.0.1:6379/0",
                               redis_prefix=redis_prefix, scheduler_interval_s=0.2)


def _adapters(c, versions: list[dict]) -> dict[str, str]:
    """Each version's id -> sha256 of the adapter bytes the admin API serves (checked against its header)."""
    out = {}
    for version in versions:
        response = c.admin.get(f"/v1/versions/{version['id']}/adapter")
        assert response.status_code == 200, response.text
        out[version["id"]] = hashlib.sha256(response.content).hexdigest()
        assert response.headers["X-Checksum-Sha256"] == out[version["id"]]
    return out


def test_backup_restores_into_empty_targets_and_the_copy_serves_the_same_adapters(
        tmp_path: Path, make_postgres_database, redis_prefix: str):
    assert shutil.which("pg_dump") and shutil.which("pg_restore"), "needs PostgreSQL's client tools"
    source_url, target_url = make_postgres_database(), make_postgres_database()
    source_dir, target_dir = tmp_path / "source", tmp_path / "target"

    with running_coordinator(_settings(source_dir, source_url, redis_prefix)) as c:
        federation = _federation(c, clients_per_round=1, min_updates=1, overselect=0.0)
        client, device_id = _device(c, federation["name"], "backup-0", ["image"])
        started = c.admin.post(f"/v1/federations/{federation['id']}/rounds")
        assert started.status_code == 201, started.text
        _upload(client, device_id, *_train(client, device_id, ["image"]), ["image"])
        assert wait_for_round(c.admin, started.json()["id"])["state"] == "committed"
        versions = c.admin.get(f"/v1/federations/{federation['id']}/versions").json()
        assert len(versions) == 2, versions  # version 0 and the committed round's
        served = _adapters(c, versions)

    backed_up = _run(BACKUP, "--database-url", source_url, "--blob-dir", source_dir / "blobs", "--out", tmp_path / "b")
    assert backed_up.returncode == 0, backed_up.stderr
    backup = Path(backed_up.stdout.strip())
    manifest = dict(line.split("=", 1) for line in (backup / "MANIFEST").read_text().splitlines())
    with psycopg.connect(_libpq(source_url)) as connection:
        revision = connection.execute("SELECT version_num FROM alembic_version").fetchone()[0]  # type: ignore[index]
    assert manifest["alembic_revision"] == revision and manifest["created_at"].endswith("Z")
    for name in ("database.dump", "blobs.tar"):
        assert manifest[name] == hashlib.sha256((backup / name).read_bytes()).hexdigest()

    restore = ("--from", backup, "--database-url", target_url, "--blob-dir", target_dir / "blobs")
    restored = _run(RESTORE, *restore)
    assert restored.returncode == 0, restored.stderr
    assert _row_counts(target_url) == _row_counts(source_url)
    assert sum(_row_counts(target_url).values()) > 0
    assert sorted(p.name for p in (target_dir / "blobs" / "objects").rglob("*") if p.is_file()) == sorted(
        p.name for p in (source_dir / "blobs" / "objects").rglob("*") if p.is_file())

    again = _run(RESTORE, *restore)  # the target is no longer empty: refused, nothing touched
    assert again.returncode == 3 and "pass --force" in again.stderr, again.stderr
    assert _run(RESTORE, *restore, "--force").returncode == 0

    damaged = tmp_path / "damaged"
    shutil.copytree(backup, damaged)
    with (damaged / "blobs.tar").open("ab") as tar:
        tar.write(b"\0")
    broken = _run(RESTORE, "--from", damaged, "--database-url", target_url, "--blob-dir", tmp_path / "x", "--force")
    assert broken.returncode == 4 and "blobs.tar: sha256" in broken.stderr, broken.stderr

    with running_coordinator(_settings(target_dir, target_url, redis_prefix + "_restored")) as copy:
        assert copy.admin.get(f"/v1/federations/{federation['id']}/versions").json() == versions
        assert _adapters(copy, versions) == served


def test_scripts_explain_themselves_and_refuse_bad_arguments(tmp_path: Path):
    for script in (BACKUP, RESTORE):
        shown = _run(script, "--help")
        assert shown.returncode == 0 and "--database-url" in shown.stdout
        unknown = _run(script, "--bogus")
        assert unknown.returncode == 2 and "unknown argument: --bogus" in unknown.stderr
    missing = _run(BACKUP, "--database-url", "postgresql://x/y", "--blob-dir", tmp_path, "--out", tmp_path / "o")
    assert missing.returncode == 2 and "not a blob store" in missing.stderr
    (tmp_path / "objects").mkdir()
    sqlite = _run(BACKUP, "--database-url", "sqlite:///c.db", "--blob-dir", tmp_path, "--out", tmp_path / "o")
    assert sqlite.returncode == 2 and "must be a PostgreSQL URL" in sqlite.stderr
