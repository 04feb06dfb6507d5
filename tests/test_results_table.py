"""The results table marks banks whose released test histogram is too small to say more than its noise."""

from __future__ import annotations

import math

from fedchurn.cli.simulate import _format_table, noise_floor
from fedchurn.shared.config import apply_overrides, default_config


def _bank(n_test: int, churn_rate: float | None) -> dict[str, object]:
    return {
        "n_train": None,
        "n_test": n_test,
        "auc": 0.7,
        "pr_auc": 0.4,
        "brier": 0.1,
        "ece": 0.05,
        "model_round": 5,
        "model_auc": 0.7,
        "model_ece": 0.05,
        "epsilon": 2.0,
        "churn_rate": churn_rate,
    }


def test_the_floor_is_three_deviations_of_a_class_total_at_the_larger_sigma() -> None:
    config = default_config()  # σ_e 5, 10 bins: 3 · 5 · √10
    assert noise_floor(config) == 3 * 5 * math.sqrt(10)
    asked_more = apply_overrides(config, {"evaluation.noise_multiplier": 8.0})
    assert noise_floor(asked_more) == 3 * 8 * math.sqrt(10)
    policy_more = apply_overrides(config, {"policy.evaluation_noise_multiplier": 6.0, "evaluation.bins": 20})
    assert noise_floor(policy_more) == 3 * 6 * math.sqrt(20)


def test_banks_below_the_floor_are_marked_and_explained() -> None:
    floor = 3 * 5 * math.sqrt(10)  # 47.4
    summary = {
        "institutions": {
            "big": _bank(600, 0.2),  # 120 churned, 480 retained: clear
            "few-churned": _bank(200, 0.2),  # 40 churned < 47.4
            "few-retained": _bank(60, 0.5),  # 30 and 30
            "emptied": _bank(80, None),  # a class the noise emptied
        }
    }
    lines = _format_table(summary, floor=floor).splitlines()
    marked = {line.split()[0].rstrip("~") for line in lines[2:6] if line[21] == "~"}
    assert marked == {"few-churned", "few-retained", "emptied"}
    assert "fewer than 47 churned or retained customers" in lines[-1]


def test_without_a_floor_nothing_is_marked() -> None:
    text = _format_table({"institutions": {"tiny": _bank(10, 0.5)}})
    assert "~" not in text
