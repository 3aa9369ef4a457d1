"""Jittered exponential backoff for every loop that can fail."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays that double from `initial` to `maximum`, with ±20 % jitter so that many
    instances recovering together do not retry in lockstep."""

    initial: float = 0.5  # seconds
    maximum: float = 30.0  # seconds
    _current: float = field(init=False, default=0.0)

    def next(self) -> float:
        self._current = self.initial if self._current == 0 else min(self._current * 2, self.maximum)
        return self._current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._current = 0.0

    @property
    def failing(self) -> bool:
        return self._current != 0.0
