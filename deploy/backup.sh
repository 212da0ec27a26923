#!/usr/bin/env bash
# Backs up an mlecs coordinator: its PostgreSQL database and its blob store, with a manifest.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: deploy/backup.sh --database-url URL --blob-dir DIR --out DIR

Writes DIR/mlecs-backup-<UTC time>/ holding
  database.dump  pg_dump of the coordinator database (custom format, no owners or privileges)
  blobs.tar      the blob store's objects/ (adapters, anchors, accepted updates)
  MANIFEST       created_at, alembic_revision, and the sha256 of both files
and prints that directory's path.

  --database-url URL  the coordinator's MLECS_DATABASE_URL (postgresql:// or postgresql+psycopg://)
  --blob-dir DIR      the coordinator's blob store: <MLECS_STATE_DIR>/blobs
  --out DIR           where to create the backup directory (created if missing)

Safe while the coordinator runs: the database is dumped first (one consistent snapshot), then the blobs are
archived; blobs are content-addressed and never deleted, so every blob the dump refers to is in the tar.
Uploads still being staged (staging/) are not backed up; devices resend them. Needs pg_dump and psql of the
server's major version (or newer), tar and sha256sum. Exit status: 0 done, 2 bad arguments, 1 a step failed.
USAGE
}

die() { echo "backup.sh: $*" >&2; exit "${2:-1}"; }

database_url="" blob_dir="" out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --database-url) database_url="${2:-}"; shift 2 || die "--database-url needs a value" 2 ;;
    --blob-dir) blob_dir="${2:-}"; shift 2 || die "--blob-dir needs a value" 2 ;;
    --out) out="${2:-}"; shift 2 || die "--out needs a value" 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" 2 ;;
  esac
done
[[ -n "$database_url" ]] || die "--database-url is required (see --help)" 2
[[ -n "$blob_dir" ]] || die "--blob-dir is required (see --help)" 2
[[ -n "$out" ]] || die "--out is required (see --help)" 2
[[ -d "$blob_dir/objects" ]] || die "$blob_dir is not a blob store: it has no objects/ directory" 2
# libpq does not understand SQLAlchemy's driver suffix.
libpq_url="$(sed -E 's#^postgresql\+[a-z0-9_]+://#postgresql://#' <<<"$database_url")"
[[ "$libpq_url" == postgresql://* || "$libpq_url" == postgres://* ]] \
  || die "--database-url must be a PostgreSQL URL, got ${database_url%%://*}://..." 2

revision="$(psql "$libpq_url" -XtAc 'SELECT version_num FROM alembic_version')" \
  || die "cannot read the schema revision (is this a migrated coordinator database?)"
[[ -n "$revision" ]] || die "the database has no alembic revision: not a migrated coordinator database"

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
target="$out/mlecs-backup-$stamp"
mkdir -p "$out"
mkdir "$target" || die "$target already exists"
done=0
trap '[[ "$done" -eq 1 ]] || rm -rf "$target"' EXIT  # never leave a partial backup that looks complete

pg_dump --format=custom --no-owner --no-privileges --file="$target/database.dump" "$libpq_url" \
  || die "pg_dump failed"
tar -C "$blob_dir" -cf "$target/blobs.tar" objects || die "archiving $blob_dir/objects failed"

{
  echo "created_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "alembic_revision=$revision"
  echo "database.dump=$(sha256sum "$target/database.dump" | cut -d' ' -f1)"
  echo "blobs.tar=$(sha256sum "$target/blobs.tar" | cut -d' ' -f1)"
} >"$target/MANIFEST"
done=1
echo "$target"
