"""Planning DP-SGD for a target ε from n alone: the rule, the accountant's guarantee, refusals."""

from __future__ import annotations

import inspect
import math

import pytest
from fedchurn.shared.config import apply_overrides, default_config
from fedchurn.shared.dp_planning import (
    MAX_BATCH,
    MIN_BATCH,
    TOTAL_EPOCHS,
    plan_config,
    plan_dp,
    planned_batch_size,
    planned_local_epochs,
)
from fedchurn.shared.errors import ConfigError
from fedchurn.shared.privacy_accounting import compute_epsilon

from fedchurn.auditing.independent_accounting import pld_epsilon


def test_batch_grows_like_twice_sqrt_n_within_bounds() -> None:
    # hand-computed: 2 sqrt(473) = 43.5 -> 43; 2 sqrt(2315) = 96.2 -> 96; 2 sqrt(10_000) = 200
    assert planned_batch_size(473) == 43
    assert planned_batch_size(2315) == 96
    assert planned_batch_size(10_000) == 200
    assert planned_batch_size(200) == MIN_BATCH  # 2 sqrt(200) = 28 -> raised to the minimum, 32
    assert planned_batch_size(100) == 25  # never more than a quarter of the rows
    assert planned_batch_size(10_000_000) == MAX_BATCH
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="n_train"):
            planned_batch_size(bad)  # type: ignore[arg-type]


def test_epochs_spread_over_rounds() -> None:
    assert planned_local_epochs(rounds=5) == TOTAL_EPOCHS // 5
    assert planned_local_epochs(rounds=1) == TOTAL_EPOCHS
    assert planned_local_epochs(rounds=100) == 1  # at least one pass per round
    with pytest.raises(ConfigError, match="rounds"):
        planned_local_epochs(rounds=0)


@pytest.mark.parametrize("n_train", [300, 1163, 2315])
def test_plan_meets_the_target_by_an_independent_accountant(n_train: int) -> None:
    plan = plan_dp(n_train=n_train, target_epsilon=3.0, delta=1e-5, rounds=5)
    q = 1.0 / math.ceil(n_train / plan.batch_size)
    steps = 5 * plan.local_epochs * math.ceil(n_train / plan.batch_size)
    assert plan.sample_rate == q and plan.total_steps == steps
    rdp = compute_epsilon(noise_multiplier=plan.noise_multiplier, sample_rate=q, steps=steps, delta=1e-5)
    assert 2.9 <= rdp <= 3.0  # spends the target, not more, and not much less
    # PLD (a different, tighter accountant written apart from Opacus) must agree the target holds
    assert pld_epsilon([(plan.noise_multiplier, q, steps)], delta=1e-5) <= 3.0
    assert plan.noise_per_step == pytest.approx(plan.noise_multiplier * plan.clipping_norm / plan.batch_size)


def test_a_second_dp_phase_is_paid_for_with_more_noise() -> None:
    one = plan_dp(n_train=1000, target_epsilon=3.0, delta=1e-5, rounds=5)
    two = plan_dp(n_train=1000, target_epsilon=3.0, delta=1e-5, rounds=5, extra_epochs_per_round=1)
    assert two.total_steps > one.total_steps and two.noise_multiplier > one.noise_multiplier


def test_an_unreachable_target_is_refused_with_what_to_change() -> None:
    with pytest.raises(ConfigError, match="raise the target"):
        plan_dp(n_train=200, target_epsilon=0.3, delta=1e-5, rounds=50)  # needs σ ≈ 33


def test_the_plan_sees_only_the_row_count() -> None:
    """Choosing the plan must cost no ε: it never receives a row, a label or a statistic of them."""
    assert set(inspect.signature(plan_dp).parameters) == {
        "n_train",
        "target_epsilon",
        "delta",
        "rounds",
        "extra_epochs_per_round",
        "accountant",
    }
    assert set(inspect.signature(plan_config).parameters) == {"config", "n_train", "extra_epochs_per_round"}


def test_plan_config_sets_training_and_keeps_the_target() -> None:
    config = apply_overrides(default_config(), {"privacy.noise_multiplier": None, "privacy.target_epsilon": 3.0})
    planned = plan_config(config, n_train=2315)
    assert planned.training.batch_size == 96
    assert planned.training.local_epochs == planned_local_epochs(rounds=config.rounds)
    assert planned.privacy.target_epsilon == 3.0 and planned.privacy.noise_multiplier is None
    fixed_sigma = apply_overrides(config, {"privacy.noise_multiplier": 1.2, "privacy.target_epsilon": None})
    with pytest.raises(ConfigError, match="target"):
        plan_config(fixed_sigma, n_train=1000)
