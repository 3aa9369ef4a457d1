#!/usr/bin/env bash
# Restore a dump made by scripts/backup_db.sh into a new database.
#
#   scripts/restore_db.sh [--force] DUMPFILE TARGET_DB_NAME
#
# The server is the one of IOTHUB_DATABASE_URL (its database part is replaced by the target), or
# else the PG* variables. TARGET_DB_NAME is created (from template0); if it exists the script
# refuses, unless --force, which drops it first (disconnecting its sessions). When the dump holds
# TimescaleDB objects, the extension is created first and the restore runs between
# timescaledb_pre_restore() and timescaledb_post_restore(), as TimescaleDB requires; a server
# without the extension cannot restore such a dump and the script says so before creating
# anything. Ends with ANALYZE, since a restored database has no planner statistics.
# PSQL / PG_RESTORE override the binaries; RESTORE_JOBS=N restores with N parallel jobs.
set -o errexit -o pipefail -o nounset

PSQL=${PSQL:-psql}
PG_RESTORE=${PG_RESTORE:-pg_restore}
MAINTENANCE_DB=${RESTORE_MAINTENANCE_DB:-postgres}
RESTORE_JOBS=${RESTORE_JOBS:-}

log() {
    printf '%s restore_db: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

fail() {
    log "FAILED: $*"
    exit 1
}

usage() {
    echo "usage: $(basename "$0") [--force] DUMPFILE TARGET_DB_NAME" >&2
}

force=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) force=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage; exit 2 ;;
        *) break ;;
    esac
done
[[ $# -eq 2 ]] || { usage; exit 2; }
dump=$1
target=$2

[[ -f "$dump" && -r "$dump" ]] || fail "cannot read $dump"
# A plain identifier: it is put into a connection string and must not need quoting there.
[[ "$target" =~ ^[A-Za-z_][A-Za-z0-9_]{0,62}$ ]] \
    || fail "TARGET_DB_NAME must be letters, digits and _ (at most 63), got '$target'"
[[ "$target" != "$MAINTENANCE_DB" ]] || fail "refusing to restore into $MAINTENANCE_DB"
[[ -z "$RESTORE_JOBS" || "$RESTORE_JOBS" =~ ^[1-9][0-9]*$ ]] || fail "RESTORE_JOBS must be > 0"

# A connection string for database $1 on the configured server.
dsn_for() {
    local url=${IOTHUB_DATABASE_URL:-}
    if [[ -z "$url" ]]; then
        printf 'dbname=%s' "$1"
    elif [[ "$url" == postgres://* || "$url" == postgresql://* ]]; then
        # libpq lets a dbname query parameter override the URL's path.
        if [[ "$url" == *\?* ]]; then printf '%s&dbname=%s' "$url" "$1"
        else printf '%s?dbname=%s' "$url" "$1"; fi
    else
        printf '%s dbname=%s' "$url" "$1"  # conninfo: the last dbname wins
    fi
}

sql_on() {
    local db=$1
    shift
    "$PSQL" -X -q -At -v ON_ERROR_STOP=1 "$@" --dbname="$(dsn_for "$db")"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log "reading the table of contents of $dump"
"$PG_RESTORE" --list "$dump" > "$work/toc" 2> "$work/toc.err" \
    || fail "$dump is not a pg_dump custom-format archive: $(head -n 1 "$work/toc.err")"
# COMMENT ON EXTENSION needs the extension's owner; skipping it keeps a non-superuser restore
# from stopping on a comment.
grep -v ' COMMENT - EXTENSION ' "$work/toc" > "$work/toc.restore" || true

timescale=0
if grep -Eq ' EXTENSION - timescaledb( |$)|_timescaledb_catalog' "$work/toc"; then
    timescale=1
fi

server_has=$(sql_on "$MAINTENANCE_DB" \
    -c "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'") \
    || fail "cannot connect to the server"
if [[ $timescale -eq 1 && "$server_has" == "0" ]]; then
    fail "the dump contains TimescaleDB objects and this server does not have the extension"
fi

exists=$(sql_on "$MAINTENANCE_DB" -v name="$target" <<'SQL'
SELECT count(*) FROM pg_database WHERE datname = :'name';
SQL
)
if [[ "$exists" != "0" ]]; then
    [[ $force -eq 1 ]] || fail "database $target exists; use --force to replace it"
    log "dropping the existing database $target (--force)"
    sql_on "$MAINTENANCE_DB" -v name="$target" <<'SQL'
DROP DATABASE :"name" WITH (FORCE);
SQL
fi

log "creating database $target"
sql_on "$MAINTENANCE_DB" -v name="$target" <<'SQL'
CREATE DATABASE :"name" TEMPLATE template0;
SQL

if [[ $timescale -eq 1 ]]; then
    log "the dump has TimescaleDB objects: timescaledb_pre_restore()"
    sql_on "$target" <<'SQL' > /dev/null
CREATE EXTENSION IF NOT EXISTS timescaledb;
SELECT timescaledb_pre_restore();
SQL
fi

log "restoring $dump into $target"
jobs=()
[[ -z "$RESTORE_JOBS" ]] || jobs=(--jobs="$RESTORE_JOBS")
if ! "$PG_RESTORE" --no-owner --no-privileges --exit-on-error "${jobs[@]}" \
    --use-list="$work/toc.restore" --dbname="$(dsn_for "$target")" "$dump"; then
    fail "pg_restore failed; the partly restored database $target was left for inspection" \
        "(rerun with --force to replace it)"
fi

if [[ $timescale -eq 1 ]]; then
    log "timescaledb_post_restore()"
    sql_on "$target" -c "SELECT timescaledb_post_restore()" > /dev/null
fi

log "ANALYZE $target"
sql_on "$target" -c "ANALYZE"
log "done: $dump restored into $target"
