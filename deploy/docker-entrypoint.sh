#!/usr/bin/env bash
# Container entry point of iothub.
#
#   docker-entrypoint.sh [run [ARGS...]]   prepare the database, then become `iothub run`
#   docker-entrypoint.sh COMMAND [ARGS...] any other iothub command, as is (simulate, query, ...)
#
# Preparing the database means, in this order: apply the schema migrations; make telemetries a
# TimescaleDB hypertable and telemetry_hourly / telemetry_daily continuous aggregates (kept a
# plain table and plain views when the server has no TimescaleDB); load the
# development data set when IOTHUB_SEED_DATA is true. All three are idempotent, so every start
# of the container runs them. The daemon is started with `exec` so that it is PID 1's direct
# replacement and receives docker's SIGTERM itself (graceful drain: flush, commit, acknowledge).
#
# Entry point knobs (not IOTHUB_* variables: iothub refuses unknown IOTHUB_* names):
#   ENTRYPOINT_DB_WAIT   seconds to keep retrying `iothub migrate` while the database cannot be
#                        reached (exit code 69), default 60; compose already waits for a healthy
#                        db, other orchestrators may not.
set -o errexit -o pipefail -o nounset

# Exit codes of the iothub command (iothub/exitcodes.py).
readonly EXIT_EXTENSION_UNAVAILABLE=3
readonly EXIT_REFUSED=4
readonly EXIT_CONNECTION_FAILED=69
readonly RETRY_PAUSE=2 # seconds between attempts to reach the database

# One JSON line on stderr, like the service's own logs, so log shippers parse both alike.
log() {
	local level=$1 event=$2 message=$3
	printf '{"timestamp": "%s", "level": "%s", "logger": "docker-entrypoint", "event": "%s", "message": "%s"}\n' \
		"$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)" "$level" "$event" "$message" >&2
}

is_true() {
	case "${1,,}" in
	1 | true | yes | on) return 0 ;;
	*) return 1 ;;
	esac
}

migrate() {
	local deadline=$((SECONDS + ${ENTRYPOINT_DB_WAIT:-60})) rc
	while true; do
		rc=0
		iothub migrate || rc=$?
		if ((rc == 0)); then
			return 0
		fi
		if ((rc != EXIT_CONNECTION_FAILED || SECONDS >= deadline)); then
			log error migrate_failed "schema migrations failed with exit code ${rc}"
			exit "$rc"
		fi
		log warning database_unreachable "database not reachable yet, retrying in ${RETRY_PAUSE}s"
		sleep "$RETRY_PAUSE"
	done
}

setup_timescaledb() {
	local rc=0
	iothub setup-timescaledb || rc=$?
	case $rc in
	0) ;;
	"$EXIT_EXTENSION_UNAVAILABLE")
		log warning timescaledb_unavailable \
			"the server has no TimescaleDB extension: telemetries stays a plain PostgreSQL table"
		;;
	*)
		log error timescaledb_setup_failed "setup-timescaledb failed with exit code ${rc}"
		exit "$rc"
		;;
	esac
}

seed() {
	if ! is_true "${IOTHUB_SEED_DATA:-false}"; then
		return 0
	fi
	local rc=0
	iothub seed || rc=$?
	case $rc in
	0) ;;
	"$EXIT_REFUSED")
		# The data set is already there (an earlier start seeded it): nothing to do.
		log info seed_skipped "development data already present"
		;;
	*)
		log error seed_failed "seed failed with exit code ${rc}"
		exit "$rc"
		;;
	esac
}

main() {
	if (($# == 0)); then
		set -- run
	fi
	if [[ $1 != run ]]; then
		exec iothub "$@"
	fi
	shift
	migrate
	setup_timescaledb
	seed
	log info entrypoint_ready "database prepared, starting the daemon"
	exec iothub run "$@"
}

main "$@"
