"""Arrival processes: mean rate and burstiness with fixed seeds."""

import math

import numpy as np
import pytest

from fitserve.bench.arrivals import arrival_offsets, parse_rate


def gaps(offsets: list[float]) -> np.ndarray:
    return np.diff(np.asarray(offsets))


def test_poisson_arrivals_have_the_asked_mean_rate_and_exponential_gaps():
    offsets = arrival_offsets(20001, rate=8.0, burstiness=1.0, rng=np.random.default_rng(0))
    assert offsets[0] == 0.0 and all(b >= a for a, b in zip(offsets, offsets[1:]))
    intervals = gaps(offsets)
    assert 1 / intervals.mean() == pytest.approx(8.0, rel=0.03)
    # An exponential distribution's coefficient of variation is 1.
    assert intervals.std() / intervals.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_the_rate_and_sets_the_variability(burstiness):
    intervals = gaps(arrival_offsets(20001, rate=5.0, burstiness=burstiness, rng=np.random.default_rng(1)))
    assert 1 / intervals.mean() == pytest.approx(5.0, rel=0.05)
    # Gamma with shape k has coefficient of variation 1/sqrt(k): bursty below 1, smooth above.
    assert intervals.std() / intervals.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.07)


def test_same_seed_same_arrivals_and_infinite_rate_sends_at_once():
    first = arrival_offsets(50, 3.0, 1.0, np.random.default_rng(42))
    assert first == arrival_offsets(50, 3.0, 1.0, np.random.default_rng(42))
    assert first != arrival_offsets(50, 3.0, 1.0, np.random.default_rng(43))
    assert arrival_offsets(4, math.inf) == [0.0] * 4


def test_invalid_rates_are_refused_with_a_message():
    with pytest.raises(ValueError, match="rate"):
        arrival_offsets(3, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets(3, 1.0, burstiness=0)
    assert parse_rate("inf") == math.inf
    with pytest.raises(ValueError):
        parse_rate("-2")
