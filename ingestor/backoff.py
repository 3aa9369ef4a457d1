"""The one retry policy: jittered exponential backoff, with an optional give-up deadline.

Every loop that can fail (the catalog listener, retention, the outbox worker and its rows, the
no-data timer, the service's writer) waits by this policy. The model is psycopg_pool's
`AttemptWithBackoff`: the delay doubles from an initial one, each delay is jittered so that many
instances recovering together do not retry in lockstep, and with a deadline the last wait is cut
so that it ends at the deadline instead of past it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

JITTER: Final = 0.2  # ±20 %
# 2**30 times the initial delay is far past any cap we use; a bound keeps the float finite
# after thousands of failures.
MAX_DOUBLINGS: Final = 30


def delay_after(attempts: int, *, initial: float, maximum: float, jitter: float = JITTER) -> float:
    """Seconds to wait after `attempts` failed attempts: `initial`·2^(attempts-1), capped at
    `maximum`, then jittered by ±`jitter` (so the cap itself may be exceeded by the jitter).

    Pure in its arguments (apart from the random jitter): a schedule kept in the database, as
    the outbox's attempt count, asks it directly instead of keeping a `Backoff`."""
    doublings = min(max(attempts - 1, 0), MAX_DOUBLINGS)
    return min(initial * 2.0**doublings, maximum) * random.uniform(1 - jitter, 1 + jitter)


@dataclass
class Backoff:
    """Delays that double from `initial` to `maximum`, with ±20 % jitter so that many
    instances recovering together do not retry in lockstep.

    With `give_up_after` (seconds, counted from the first failure since the last `reset()`),
    no delay runs past that deadline, and `gave_up` says when it has passed."""

    initial: float = 0.5  # seconds
    maximum: float = 30.0  # seconds
    give_up_after: float | None = None  # seconds; None: retry for ever
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _failures: int = field(init=False, default=0)
    _give_up_at: float | None = field(init=False, default=None)

    def next(self) -> float:
        """Count one more failure and return how long to wait before the next attempt."""
        now = self.clock()
        if self._failures == 0 and self.give_up_after is not None:
            self._give_up_at = now + self.give_up_after
        self._failures += 1
        delay = delay_after(self._failures, initial=self.initial, maximum=self.maximum)
        if self._give_up_at is not None:
            delay = max(0.0, min(delay, self._give_up_at - now))
        return delay

    def reset(self) -> None:
        """The operation succeeded: the next failure starts from `initial` again."""
        self._failures = 0
        self._give_up_at = None

    @property
    def failing(self) -> bool:
        """At least one failure since the last success."""
        return self._failures != 0

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def gave_up(self) -> bool:
        """The give-up deadline has passed (never without `give_up_after`)."""
        return self._give_up_at is not None and self.clock() >= self._give_up_at
