"""The one-run empirical audit: its statistics against hand-computed values, and the canary run both ways."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedchurn.auditing.empirical import epsilon_lower_bound, guess, tail_bound
from fedchurn.clients.empirical_run import run_empirical_audit
from fedchurn.shared.config import default_config


def _tail(r: int, v: int, p: float) -> float:
    """P[Binomial(r, p) >= v], summed exactly (independent of scipy)."""
    return sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(v, r + 1))


def test_all_guesses_right_matches_the_closed_form() -> None:
    # δ = 0, v = r: P[W >= r] = p^r <= β  <=>  p <= β^(1/r)  <=>  ε <= ln(x / (1 - x)), x = β^(1/r)
    for r, beta in ((20, 0.05), (200, 0.05), (40, 0.01)):
        x = beta ** (1 / r)
        expected = math.log(x / (1 - x))
        assert epsilon_lower_bound(m=1000, r=r, v=r, delta=0.0, beta=beta) == pytest.approx(expected, abs=1e-9)


def test_partial_success_matches_an_exact_binomial_tail() -> None:
    eps = epsilon_lower_bound(m=1000, r=200, v=150, delta=0.0, beta=0.05)
    p = math.exp(eps) / (1 + math.exp(eps))
    assert _tail(200, 150, p) == pytest.approx(0.05, rel=1e-6)  # the bound sits where the tail reaches β
    assert tail_bound(epsilon=eps, delta=0.0, m=1000, r=200, v=150) == pytest.approx(_tail(200, 150, p), rel=1e-9)


def test_delta_term_by_hand() -> None:
    # m = 2, r = 2, v = 2, ε = 0 (p = 1/2): P[W >= 2] = 1/4; window i=1: P[1 <= W < 2] = 1/2 -> 2*2/1 * 1/2 = 2;
    # i=2: P[0 <= W < 2] = 3/4 -> 2*2/2 * 3/4 = 1.5; max = 2, so the bound is 1/4 + 2δ.
    assert tail_bound(epsilon=0.0, delta=0.01, m=2, r=2, v=2) == pytest.approx(0.25 + 0.02)
    without = epsilon_lower_bound(m=1000, r=200, v=180, delta=0.0, beta=0.05)
    assert 0 < epsilon_lower_bound(m=1000, r=200, v=180, delta=1e-3, beta=0.05) < without


def test_chance_level_gives_no_bound_and_bad_input_is_refused() -> None:
    assert epsilon_lower_bound(m=1000, r=200, v=100, delta=1e-5, beta=0.05) == 0.0
    assert epsilon_lower_bound(m=1000, r=200, v=110, delta=1e-5, beta=0.05) == 0.0  # within chance at 95%
    with pytest.raises(ValueError):
        epsilon_lower_bound(m=10, r=20, v=5, delta=0.0, beta=0.05)


def test_guess_counts_top_and_bottom() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.7])
    included = np.array([True, False, False, True, True, True])
    g = guess(scores, included, k_positive=2, k_negative=2)  # top: 0.9 (in), 0.8 (out); bottom: 0.1 (out), 0.2 (in)
    assert (g.m, g.r, g.v) == (6, 4, 2)


@pytest.mark.parametrize("enabled", [False, True], ids=["dp-off", "dp-on"])
def test_canary_run_finds_leakage_without_dp_and_never_more_than_claimed_with_dp(enabled: bool) -> None:
    """The demo's smallest bank, its own training path (vectorised DP-SGD, σ 1.2, its q and steps), 200 canaries."""
    config = default_config()
    config = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, enabled=enabled))
    result = run_empirical_audit(config, "bank-06", canaries=200, beta=0.05)
    assert result.black_box.m == result.white_box.m == 200 and result.black_box.r == 40
    assert 60 <= result.canaries_included <= 140  # each with probability 1/2
    if not enabled:
        assert math.isinf(result.claimed_epsilon)
        assert result.epsilon_lower_bound > 1.0  # clearly above zero (all 40 right give 2.55; measured: 40/40)
    else:
        assert result.noise_multiplier == 1.2 and result.steps == config.rounds * math.ceil(
            (260 + result.canaries_included) / 64
        )
        assert 0.0 <= result.epsilon_lower_bound <= result.claimed_epsilon
