"""Exit codes of the `iothub` command, named so that scripts and unit files can rely on them.

The values follow sysexits.h where one fits, so systemd's `RestartPreventExitStatus=` can tell a
configuration mistake (restarting will not help) from a crash (restarting may).
"""

from __future__ import annotations

OK = 0
FAILURE = 1  # the command ran and found a problem (e.g. an invalid rule)
USAGE = 2  # bad command line (argparse uses 2 as well)
EXTENSION_UNAVAILABLE = 3  # setup-timescaledb: the server does not have TimescaleDB
REFUSED = 4  # seed: seeded data exists and --force was not given
CONNECTION_FAILED = 69  # EX_UNAVAILABLE: the database or the broker cannot be reached
CRASH = 70  # EX_SOFTWARE: an unexpected error stopped the service
CONFIG_ERROR = 78  # EX_CONFIG: the configuration is invalid
INTERRUPTED = 130  # a second signal forced an immediate exit
