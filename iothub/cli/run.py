"""`iothub run`: the daemon. Ingestion, rules and actions, with an orderly stop."""

from __future__ import annotations

import argparse

import structlog

from config.settings import MAX_WORKERS, Settings
from iothub import exitcodes, signals
from iothub.cli import argtypes
from iothub.daemon import assemble, heap
from iothub.daemon.systemd import SystemdNotifier

log = structlog.get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-rules", action="store_true", help="store telemetry only; rules and actions off"
    )
    parser.add_argument(
        "--workers",
        type=argtypes.count_up_to(MAX_WORKERS),
        default=None,
        metavar="N",
        help=f"worker processes, 1 to {MAX_WORKERS} (overrides IOTHUB_WORKERS; 1: one process)",
    )


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.workers is not None:
        # Validated by argtypes (1..MAX_WORKERS), like the setting itself.
        settings = settings.model_copy(update={"workers": args.workers})
    log.info("config_loaded", settings=settings.redacted())
    notifier = SystemdNotifier.from_environ()
    service = assemble.build(settings, notifier, rules_on=not args.no_rules)
    heap.freeze_startup_objects()  # everything is imported and built: see iothub.daemon.heap

    def stop(name: str) -> None:
        service.request_stop(f"signal {name}")

    # A second signal: the operator means it. Unacknowledged messages come back later.
    with signals.on_stop(stop, repeat=signals.exit_now(exitcodes.INTERRUPTED)):
        return service.run()
