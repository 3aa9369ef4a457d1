"""`iothub.signals.on_stop`: one stop for every command."""

from __future__ import annotations

import os
import signal

from iothub import signals


def test_first_signal_calls_back_later_ones_repeat_and_handlers_come_back() -> None:
    """The first SIGTERM/SIGINT reaches the callback, every later one `repeat`; on the way out
    the previous handlers are in place again."""
    before = signal.getsignal(signal.SIGTERM)
    stops: list[str] = []
    repeats: list[str] = []
    with signals.on_stop(stops.append, repeat=repeats.append):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    assert stops == ["SIGTERM"]
    assert repeats == ["SIGINT", "SIGTERM"]
    assert signal.getsignal(signal.SIGTERM) is before
