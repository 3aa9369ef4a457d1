"""The `iothub` command line: one console script, one subcommand per job.

Each subcommand is a module of its own (iothub/cli/<command>.py) with `add_arguments(parser)`
and `main(settings, args) -> int`; main.py only loads the settings once, sets logging up, and
maps failures to the exit codes of `iothub.exitcodes`.

Only the command that runs has its module imported. A worker process of `iothub run --workers N`
is started with multiprocessing `spawn`, which runs the main module again in the new interpreter
(as `__mp_main__`), and the main module is this one: whatever it imports, every worker imports.
Were every command imported here, each worker would carry the daemon's MQTT client and action
senders, the simulator and the demo, and `iothub run` protobuf for the simulator's Sparkplug
traffic. The modules are still named here for mypy (each checked against `CommandModule`) and
for the import contracts, and tests/unit/test_process_imports.py imports every one of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import structlog

from config.settings import ConfigError, Settings, load_settings
from iothub import exitcodes, logs

if TYPE_CHECKING:
    from iothub.cli import demo, migrate, query, rules, run, seed, setup_timescaledb, simulate


class CommandModule(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def main(self, settings: Settings, args: argparse.Namespace) -> int: ...


# name -> (its module in iothub.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "the daemon: ingestion + rules + actions"),
    "migrate": ("migrate", "apply schema migrations"),
    "setup-timescaledb": ("setup_timescaledb", "hypertable, compression and retention"),
    "seed": ("seed", "load the development data set (idempotent)"),
    "simulate": ("simulate", "simulated devices publishing telemetry"),
    "demo": ("demo", "the whole pipeline on this machine, then a summary"),
    "rules": ("rules", "check rules; backtest a rule over stored history"),
    "query": ("query", "the example queries: last readings, recent readings, bucket stats"),
}

if TYPE_CHECKING:  # what load() returns, checked statically: each module has the shape
    _CHECKED: tuple[CommandModule, ...] = (
        demo,
        migrate,
        query,
        rules,
        run,
        seed,
        setup_timescaledb,
        simulate,
    )


def load(name: str) -> CommandModule:
    """The module of command `name`, imported now (see the module's docstring for why)."""
    return cast(CommandModule, importlib.import_module(f"iothub.cli.{COMMANDS[name][0]}"))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, only that command's options are added (the others are named,
    for the help, without theirs)."""
    parser = argparse.ArgumentParser(
        prog="iothub",
        description="MQTT telemetry into PostgreSQL/TimescaleDB, with a rule engine.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file of settings (IOTHUB_* environment variables override it)",
    )
    parser.add_argument("--debug", action="store_true", help="debug logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            load(name).add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(only=chosen or "").parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        # One line, no traceback: the operator has a typo to fix, not a bug to report.
        print(f"iothub: {exc}", file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    if args.debug:
        settings = settings.model_copy(update={"log_level": "debug"})
    logs.configure(settings.log_level, settings.log_format)
    try:
        return load(args.command).main(settings, args)
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    except Exception as exc:
        log = structlog.get_logger("iothub")
        if args.debug:
            log.exception("command_crashed", command=args.command)
        else:
            log.error("command_crashed", command=args.command, error=f"{type(exc).__name__}: {exc}")
        return exitcodes.CRASH


if __name__ == "__main__":
    sys.exit(main())
