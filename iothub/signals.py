"""One way for every command to stop on SIGINT/SIGTERM: `on_stop`.

A handler only hands the stop over (the callback sets a flag or an event); the work notices it
and winds down in its own order. A second signal means the operator wants out now: by default
the process exits at once, before any clean-up (what was not acknowledged comes back from the
broker). Commands whose clean-up must run to its end (the demo) pass `repeat` instead.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from iothub import exitcodes

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Written with os.write: a signal handler must not take the logging locks the interrupted
# thread may hold.
FORCED_EXIT_LINE = b'{"event": "forced_exit", "level": "error"}\n'

OnSignal = Callable[[str], None]
"""Called with the signal's name, e.g. "SIGTERM"."""


def force_exit(name: str) -> None:
    """Exit at once with INTERRUPTED, without clean-up."""
    os.write(2, FORCED_EXIT_LINE)
    os._exit(exitcodes.INTERRUPTED)


@contextmanager
def on_stop(callback: OnSignal, *, repeat: OnSignal = force_exit) -> Iterator[None]:
    """While inside: the first SIGINT/SIGTERM calls `callback`, every later one `repeat`; the
    previous handlers are put back on the way out.

    Outside the main thread (a library caller's worker, a test) nothing is installed: Python
    only lets the main thread set signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
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
