#!/usr/bin/env bash
# The demo command: installs what is missing, then runs `iothub demo` (the whole pipeline on
# this machine for a minute, with live progress, then a summary). Extra arguments go to
# `iothub demo`, e.g. `scripts/demo.sh --duration 30`.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/iothub demo "$@"
