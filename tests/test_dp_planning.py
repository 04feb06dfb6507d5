"""Planning DP-SGD for a target ε from n alone: the rule, the accountant's guarantee, refusals."""

from __future__ import annotations

import inspect
import math

import pytest

from fedchurn.auditing.independent_accounting import pld_epsilon
from fedchurn.shared.config import apply_overrides, default_config
from fedchurn.shared.dp_planning import (
    MAX_BATCH,
    MIN_BATCH,
    TOTAL_EPOCHS,
    bank_training_config,
    plan_config,
    plan_dp,
    planned_batch_size,
    planned_local_epochs,
)
from fedchurn.shared.errors import ConfigError
from fedchurn.shared.privacy_accounting import compute_epsilon


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


def test_a_bank_plans_from_its_own_rows_only_with_a_target_and_plan_auto() -> None:
    target = apply_overrides(default_config(), {"privacy.noise_multiplier": None, "privacy.target_epsilon": 3.0})
    assert target.training.plan == "auto"  # the default
    # Hand-computed for 473 rows, 5 rounds: B = round(2 sqrt(473)) = round(43.5) = 43; 20 / 5 = 4 epochs a round.
    mine = bank_training_config(target, n_train=473)
    assert (mine.training.batch_size, mine.training.local_epochs) == (43, 4)
    assert (mine.training.learning_rate, mine.training.optimizer, mine.privacy.clipping_norm) == (0.01, "adam", 0.5)
    assert mine.privacy.target_epsilon == 3.0 and mine.privacy.noise_multiplier is None
    # Another bank of the same consortium, same config: its own plan (2 sqrt(10000) = 200).
    assert bank_training_config(target, n_train=10_000).training.batch_size == 200
    # A fixed σ, DP off, or plan: fixed: the settings as given.
    fixed_sigma = apply_overrides(target, {"privacy.noise_multiplier": 1.2, "privacy.target_epsilon": None})
    no_dp = apply_overrides(target, {"privacy.enabled": False})
    as_given = apply_overrides(target, {"training.plan": "fixed"})
    for config in (fixed_sigma, no_dp, as_given):
        assert bank_training_config(config, n_train=473) == config
    # No useful plan (σ > MAX_USEFUL_SIGMA): the config's own settings, σ still derived from the target later.
    hopeless = apply_overrides(target, {"privacy.target_epsilon": 0.3, "rounds": 50})
    assert bank_training_config(hopeless, n_train=200) == hopeless


def test_training_config_refuses_an_unknown_plan() -> None:
    with pytest.raises(ConfigError, match="training.plan"):
        apply_overrides(default_config(), {"training.plan": "guess"})
