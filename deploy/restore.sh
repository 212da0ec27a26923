#!/usr/bin/env bash
# Restores an mlecs backup made by deploy/backup.sh into an empty database and an empty blob directory.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: deploy/restore.sh --from BACKUP_DIR --database-url URL --blob-dir DIR [--force]

Checks BACKUP_DIR/MANIFEST's sha256 of database.dump and blobs.tar, then restores the database (pg_restore in
one transaction) and unpacks the blobs into DIR (created if missing).

  --from DIR          a directory written by deploy/backup.sh
  --database-url URL  the target database; it must exist (createdb) and hold no tables
  --blob-dir DIR      the target blob store: <MLECS_STATE_DIR>/blobs of the coordinator that will use it
  --force             restore over a non-empty target: drops the backed-up tables first and deletes
                      DIR/objects and DIR/staging. Stop every coordinator using the target first.

Start the coordinators only after it finishes. If the backup's alembic_revision is older than the code you
run, the coordinator migrates it on start (or run `mlecs-coordinator migrate`). Exit status: 0 restored,
2 bad arguments, 3 the target is not empty (nothing changed), 4 the backup is damaged, 1 a step failed.
USAGE
}

die() { echo "restore.sh: $*" >&2; exit "${2:-1}"; }

from="" database_url="" blob_dir="" force=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --from) from="${2:-}"; shift 2 || die "--from needs a value" 2 ;;
    --database-url) database_url="${2:-}"; shift 2 || die "--database-url needs a value" 2 ;;
    --blob-dir) blob_dir="${2:-}"; shift 2 || die "--blob-dir needs a value" 2 ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" 2 ;;
  esac
done
[[ -n "$from" ]] || die "--from is required (see --help)" 2
[[ -n "$database_url" ]] || die "--database-url is required (see --help)" 2
[[ -n "$blob_dir" ]] || die "--blob-dir is required (see --help)" 2
[[ -f "$from/MANIFEST" ]] || die "$from has no MANIFEST: not a backup made by deploy/backup.sh" 2
libpq_url="$(sed -E 's#^postgresql\+[a-z0-9_]+://#postgresql://#' <<<"$database_url")"
[[ "$libpq_url" == postgresql://* || "$libpq_url" == postgres://* ]] \
  || die "--database-url must be a PostgreSQL URL, got ${database_url%%://*}://..." 2

manifest() { sed -n "s/^$1=//p" "$from/MANIFEST"; }
for file in database.dump blobs.tar; do
  expected="$(manifest "$file")"
  [[ -f "$from/$file" ]] || die "$from/$file is missing" 4
  actual="$(sha256sum "$from/$file" | cut -d' ' -f1)"
  [[ -n "$expected" && "$actual" == "$expected" ]] \
    || die "$from/$file: sha256 $actual does not match the MANIFEST's ${expected:-<none>}" 4
done

tables="$(psql "$libpq_url" -XtAc "SELECT count(*) FROM information_schema.tables
  WHERE table_schema NOT IN ('pg_catalog', 'information_schema')")" || die "cannot connect to the target database"
blobs_present=0
if [[ -d "$blob_dir" ]] && [[ -n "$(ls -A "$blob_dir")" ]]; then blobs_present=1; fi
if [[ "$force" -eq 0 ]]; then
  [[ "$tables" -eq 0 ]] || die "the target database holds $tables tables; restore into an empty one or pass --force" 3
  [[ "$blobs_present" -eq 0 ]] || die "$blob_dir is not empty; restore into an empty directory or pass --force" 3
fi

clean=()
[[ "$force" -eq 1 && "$tables" -ne 0 ]] && clean=(--clean --if-exists)
pg_restore --single-transaction --exit-on-error --no-owner --no-privileges "${clean[@]}" \
  --dbname="$libpq_url" "$from/database.dump" || die "pg_restore failed (the database was left unchanged)"
mkdir -p "$blob_dir"
[[ "$force" -eq 1 ]] && rm -rf "${blob_dir:?}/objects" "${blob_dir:?}/staging"
tar -C "$blob_dir" -xf "$from/blobs.tar" || die "unpacking the blobs into $blob_dir failed"
echo "restored the backup of $(manifest created_at) (schema $(manifest alembic_revision)) into database $(psql "$libpq_url" -XtAc "SELECT current_database()") and $blob_dir"
