"""One way for every command to stop on SIGINT/SIGTERM: `on_stop`.

A handler only hands the stop over (the callback sets a flag or an event); the work notices it
and winds down in its own order. What a second signal does is the command's to say: the daemon
exits at once (`exit_now`, what was not acknowledged comes back from the broker); the demo,
whose clean-up must run to its end, only logs it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Written with os.write: a signal handler must not take the logging locks the interrupted
# thread may hold.
FORCED_EXIT_LINE = b'{"event": "forced_exit", "level": "error"}\n'

OnSignal = Callable[[str], None]
"""Called with the signal's name, e.g. "SIGTERM"."""


def exit_now(code: int) -> OnSignal:
    """A `repeat` that exits at once with `code`, without clean-up."""

    def exit_(_name: str) -> None:
        os.write(2, FORCED_EXIT_LINE)
        os._exit(code)

    return exit_


@contextmanager
def on_stop(callback: OnSignal, *, repeat: OnSignal) -> Iterator[None]:
    """While inside: the first SIGINT/SIGTERM calls `callback`, every later one `repeat`; the
    previous handlers are put back on the way out.

    Outside the main thread (a library caller's worker, a test) nothing is installed: Python
    only lets the main thread set signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if seen.is_set():
            repeat(name)
            return
        seen.set()
        callback(name)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: installed outside Python, nothing to put back
                signal.signal(sig, handler)
