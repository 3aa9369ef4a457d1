"""argparse helpers shared by the commands: `type=` parsers, each parsing one option's text or
saying in one line why it cannot, and the traffic options the simulator and the demo share."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _whole(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive(text: str) -> float:
    """A finite number above 0 (seconds, a rate)."""
    value = _number(text, "a positive number")
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def share(text: str) -> float:
    """A fraction from 0 to 1."""
    value = _number(text, "between 0 and 1")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1")
    return value


def count(text: str) -> int:
    """A whole number of at least 1."""
    value = _whole(text, "a whole number of at least 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def count_up_to(limit: int) -> Callable[[str], int]:
    """A whole number from 1 to `limit`."""

    def parse(text: str) -> int:
        value = _whole(text, "a whole number")
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be between 1 and {limit}")
        return value

    return parse


def add_rate(parser: argparse.ArgumentParser, default: float) -> None:
    parser.add_argument(
        "--rate",
        type=positive,
        default=default,
        help=f"messages per second, all devices together (default {default:g})",
    )


def add_bad_share(parser: argparse.ArgumentParser, default: float) -> None:
    parser.add_argument(
        "--bad-share",
        type=share,
        default=default,
        help=f"share of deliberately bad messages, 0..1 (default {default:g})",
    )
