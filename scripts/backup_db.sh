#!/usr/bin/env bash
# Back the iothub database up: one pg_dump in custom format, then remove old dumps.
#
#   IOTHUB_DATABASE_URL=postgresql://iothub@db/iothub scripts/backup_db.sh
#
# Database: IOTHUB_DATABASE_URL (a libpq URL or conninfo), or else the PG* variables (PGHOST,
# PGDATABASE, ...). Writes ${BACKUP_DIR:-./backups}/iothub_YYYYmmdd_HHMMSS.dump (UTC), removes
# iothub_*.dump files there older than ${BACKUP_KEEP_DAYS:-7} days, and prints the new dump's
# path on stdout; each step is logged on stderr with a timestamp. PG_DUMP overrides the pg_dump
# binary (it must be at least the server's major version).
#
# Cron, daily at 07:00:  0 7 * * * cd /opt/iothub && scripts/backup_db.sh >> backups/backup.log 2>&1
# docs/backups.md has the restore procedure and how to check a dump.
set -o errexit -o pipefail -o nounset

BACKUP_DIR=${BACKUP_DIR:-./backups}
BACKUP_KEEP_DAYS=${BACKUP_KEEP_DAYS:-7}
PG_DUMP=${PG_DUMP:-pg_dump}

log() {
    printf '%s backup_db: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

fail() {
    log "FAILED: $*"
    exit 1
}

case "$BACKUP_KEEP_DAYS" in
    '' | *[!0-9]*) fail "BACKUP_KEEP_DAYS must be a whole number of days, got '$BACKUP_KEEP_DAYS'" ;;
esac
command -v "$PG_DUMP" > /dev/null || fail "$PG_DUMP not found (set PG_DUMP to its path)"

# Only the URL's database part is shown: it may carry a password.
if [[ -n "${IOTHUB_DATABASE_URL:-}" ]]; then
    connection=(--dbname="$IOTHUB_DATABASE_URL")
    target="IOTHUB_DATABASE_URL"
else
    connection=()
    target="PG* environment (database ${PGDATABASE:-<default>})"
fi

mkdir -p "$BACKUP_DIR"
stamp=$(date -u +%Y%m%d_%H%M%S)
dump="$BACKUP_DIR/iothub_${stamp}.dump"
partial="$dump.partial"
# A dump that fails half-way must not be mistaken for a backup, nor crowd out a good one.
trap 'rm -f "$partial"' EXIT

log "dumping $target with $("$PG_DUMP" --version) to $dump"
"$PG_DUMP" "${connection[@]}" --format=custom --no-owner --no-privileges --file="$partial" \
    || fail "pg_dump exited with $?"
mv "$partial" "$dump"
log "dump written: $(du -h "$dump" | cut -f1) in $dump"

log "removing iothub_*.dump in $BACKUP_DIR older than $BACKUP_KEEP_DAYS days"
# -mmin rather than -mtime: -mtime +7 rounds ages down to whole days and keeps 7.9-day-old files.
removed=0
while IFS= read -r -d '' old; do
    rm -f -- "$old"
    log "removed $old"
    removed=$((removed + 1))
done < <(find "$BACKUP_DIR" -maxdepth 1 -type f -name 'iothub_*.dump' \
    -mmin +$((BACKUP_KEEP_DAYS * 24 * 60)) -print0)
log "done: $removed old dump(s) removed"

printf '%s\n' "$dump"
