"""The argparse type helpers the commands share (iothub/cli/argtypes.py)."""

from __future__ import annotations

import argparse

import pytest

from iothub.cli import argtypes


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "fast"])
def test_positive_refuses_what_is_not_a_finite_number_above_zero(text: str) -> None:
    """0, negatives, NaN, infinity and words are refused with a one-line reason."""
    with pytest.raises(argparse.ArgumentTypeError, match="positive number"):
        argtypes.positive(text)


def test_share_and_counts_take_their_ranges_and_nothing_else() -> None:
    """A share is 0..1, a count at least 1, a bounded count at most its limit."""
    assert argtypes.positive("0.5") == 0.5
    assert argtypes.share("0") == 0.0
    assert argtypes.share("1") == 1.0
    assert argtypes.count("1") == 1
    assert argtypes.count_up_to(10)("10") == 10
    for parse, text in (
        (argtypes.share, "1.5"),
        (argtypes.share, "nan"),
        (argtypes.count, "0"),
        (argtypes.count, "1.5"),
        (argtypes.count_up_to(10), "11"),
        (argtypes.count_up_to(10), "ten"),
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
