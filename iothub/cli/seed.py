"""`iothub seed [--force] [--dry-run]`: the original project's development data set.

What it does and when it refuses is told in iothub/devtools/seed/store.py; this prints its
report.
"""

from __future__ import annotations

import argparse

from config.settings import Settings
from iothub.devtools.seed import store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="refresh the seeded rows even if they exist or were changed (others are untouched)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the data set and report counts and the plan; write nothing",
    )


def main(settings: Settings, args: argparse.Namespace) -> int:
    outcome = store.seed(
        settings,
        force=args.force,
        dry_run=args.dry_run,
        debug=bool(getattr(args, "debug", False)),
    )
    for line in outcome.report:
        print(line)
    return outcome.code
