#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite against real
# PostgreSQL and Mosquitto instances the suite starts itself (see tests/support/services.py).
# Extra arguments go to pytest, e.g. `scripts/test.sh -k faults -x`.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
