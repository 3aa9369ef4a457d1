"""The one retry policy: doubling, jittered, capped, and cut at its give-up deadline."""

from __future__ import annotations

from ingestor.backoff import Backoff, delay_after


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delays_double_from_initial_to_the_cap_within_the_jitter() -> None:
    """Each failure doubles the delay up to `maximum`, every one within ±20 %."""
    backoff = Backoff(initial=1.0, maximum=8.0)
    for expected in (1.0, 2.0, 4.0, 8.0, 8.0, 8.0):
        assert expected * 0.8 <= backoff.next() <= expected * 1.2
    assert backoff.failing and backoff.failures == 6


def test_reset_starts_again_from_initial() -> None:
    """After a success the next failure waits `initial` again, and nothing is failing."""
    backoff = Backoff(initial=1.0, maximum=8.0)
    for _ in range(4):
        backoff.next()
    backoff.reset()
    assert not backoff.failing
    assert 0.8 <= backoff.next() <= 1.2


def test_delay_after_is_the_same_schedule_as_a_pure_function() -> None:
    """Attempt n waits initial·2^(n-1), capped, ±20 %; a huge count stays finite."""
    for attempts, expected in ((0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (10, 300.0), (5000, 300.0)):
        delay = delay_after(attempts, initial=1.0, maximum=300.0)
        assert expected * 0.8 <= delay <= expected * 1.2


def test_no_wait_runs_past_the_give_up_deadline() -> None:
    """With give_up_after, the last delay ends at the deadline, and gave_up says when it passed."""
    clock = FakeClock()
    backoff = Backoff(initial=4.0, maximum=60.0, give_up_after=10.0, clock=clock)
    first = backoff.next()  # the deadline is counted from this first failure
    assert 3.2 <= first <= 4.8
    clock.now += 8.0
    assert backoff.next() <= 2.0  # 8 s ±20 % would end past the deadline: cut to what is left
    assert not backoff.gave_up
    clock.now += 2.0
    assert backoff.gave_up
    assert backoff.next() == 0.0


def test_reset_clears_the_deadline() -> None:
    """A success forgets the deadline; the next failure starts a new one."""
    clock = FakeClock()
    backoff = Backoff(initial=1.0, maximum=60.0, give_up_after=5.0, clock=clock)
    backoff.next()
    clock.now += 6.0
    assert backoff.gave_up
    backoff.reset()
    assert not backoff.gave_up
    assert backoff.next() > 0.0
    assert not backoff.gave_up
