"""`iothub demo`: the whole pipeline on this machine for a minute, live progress, then a
summary (iothub/devtools/demo/run.py tells the steps)."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Final

import structlog

from config.settings import Settings
from iothub import logs, signals
from iothub.cli import argtypes
from iothub.devtools.demo import run
from iothub.devtools.demo.console import Console

log = structlog.get_logger(__name__)

DEFAULT_DURATION: Final = 60.0  # seconds
DEFAULT_RATE: Final = 200.0  # messages per second
DEFAULT_BAD_SHARE: Final = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=argtypes.positive,
        default=DEFAULT_DURATION,
        help=f"seconds of simulated traffic (default {DEFAULT_DURATION:g})",
    )
    argtypes.add_rate(parser, DEFAULT_RATE)
    argtypes.add_bad_share(parser, DEFAULT_BAD_SHARE)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the demo database on a configured server (throwaway servers always go)",
    )


def main(settings: Settings, args: argparse.Namespace) -> int:
    console = Console(sys.stdout)
    quiet = console.tty and settings.log_level != "debug"
    if quiet:
        # On a terminal the demo's own lines tell the story; info logs would tear the live line.
        logs.configure("warning", settings.log_format)
    stop = threading.Event()
    try:

        def stopping(name: str) -> None:
            stop.set()
            log.info("demo_stopping", signal=name)

        def still_cleaning_up(name: str) -> None:
            # Clean-up must run to its end (throwaway servers, the demo database): no exit.
            log.warning("demo_still_cleaning_up", signal=name)

        with signals.on_stop(stopping, repeat=still_cleaning_up):
            return run.run(
                settings,
                console,
                stop,
                duration=float(args.duration),
                rate=float(args.rate),
                bad_share=float(args.bad_share),
                keep=bool(args.keep),
            )
    finally:
        if quiet:
            logs.configure(settings.log_level, settings.log_format)
