"""What the demo tells its user on stdout: narrative lines, a live line, the summary."""

from __future__ import annotations

import shutil
from typing import TextIO

import structlog

log = structlog.get_logger(__name__)


class Console:
    """What the demo tells its user on stdout: narrative lines, a live line, the summary.

    On a terminal the live line is redrawn in place; elsewhere progress is plain lines."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._live = False
        self._last = ""

    def say(self, text: str = "") -> None:
        if self._live:
            self.out.write("\r\x1b[K")
            self._live = False
        self.out.write(text + "\n")
        self.out.flush()

    def live(self, text: str) -> None:
        if self.tty:
            # A line longer than the terminal would wrap, and "\r" only goes back one row.
            width = shutil.get_terminal_size().columns - 1
            if len(text) > width:
                text = text[: max(width - 1, 0)] + "…"
            self.out.write("\r\x1b[K" + text)
            self.out.flush()
            self._live = True
        elif text != self._last:
            self.say(text)
        self._last = text

    def end_live(self) -> None:
        if self._live:
            self.out.write("\n")
            self.out.flush()
            self._live = False
