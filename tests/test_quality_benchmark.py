"""benchmarks/quality.py: the verdicts it prints follow the issue's criteria (hand-made figures)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.quality import best_federated, report
from fedchurn.comparison.runner import at_target_epsilon
from fedchurn.shared.config import default_config


def _bank(own: float, logreg: float, trees: float, ece: float, mean: float, rate: float) -> dict[str, list[float]]:
    return {
        "own_dp": [own, own],
        "logreg": [logreg, logreg],
        "trees": [trees, trees],
        "ece": [ece, ece],
        "ece_floor": [0.02, 0.02],
        "mean_probability": [mean, mean],
        "churn_rate": [rate, rate],
        "n_val": [100.0, 100.0],
        "n_test": [150.0, 150.0],
    }


def test_verdicts_follow_the_criteria(tmp_path: Path) -> None:
    comparison = {
        "institutions": {
            "a": {"fedrep": {"auc": 0.90, "auc_ci95": 0.01}, "local": {"auc": 0.99}, "logreg": {"auc": 0.99}},
            "b": {"fedrep": {"auc": 0.80, "auc_ci95": None}, "finetune": {"auc": 0.85, "auc_ci95": 0.02}},
        }
    }
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(comparison))
    federated = best_federated(path)
    assert federated == {"a": ("fedrep", 0.90, 0.01), "b": ("finetune", 0.85, 0.02)}  # local is not federated
    rows = {
        # a: federated 0.90 ≥ own DP 0.85, < logreg 0.91; calibrated (ECE 0.02; mean 0.19 vs 0.20: within 20 %)
        "a": _bank(0.85, 0.91, 0.95, 0.02, 0.19, 0.20),
        # b: federated 0.85 < own DP 0.86, ≥ logreg 0.84; ECE 0.05; mean 0.10 vs 0.20: off by half
        "b": _bank(0.86, 0.84, 0.90, 0.05, 0.10, 0.20),
    }
    config = at_target_epsilon(default_config(), 3.0)
    text = report(rows, federated, config=config, seeds=(0, 1))
    assert "fed>=own_dp: 1/2 institutions" in text
    assert "fed>=logreg: 1/2 institutions" in text
    assert "ece<=0.03: 1/2 institutions" in text
    assert "mean_within_20%: 1/2 institutions" in text
    # trees 0.925 on average against federated 0.875: a gap of 0.05
    assert "own trees − best federated: 0.050" in text
