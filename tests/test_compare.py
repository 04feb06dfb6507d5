"""`fedchurn compare`: one target ε for every private mode, seeds with confidence intervals, honest labels."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.comparison.report import markdown_table, mean_ci95, summarise
from fedchurn.comparison.runner import (
    COMPARE_MODES,
    at_target_epsilon,
    default_modes,
    parse_modes,
    run_comparison,
    seeds_from,
)
from fedchurn.shared.config import FedChurnConfig, SyntheticConfig, apply_overrides, default_config
from fedchurn.shared.errors import ConfigError
from fedchurn.shared.privacy_accounting import compute_epsilon, sample_rate_for

pytestmark = pytest.mark.filterwarnings("ignore")


def _config(tmp_path: Path) -> FedChurnConfig:
    base = default_config()
    config = dataclasses.replace(
        base,
        rounds=1,
        output_dir=str(tmp_path / "run"),
        data=dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=200, max_rows=300)),
    )
    return apply_overrides(config, {"training.local_epochs": 1, "training.batch_size": 64})


# --- what is compared ------------------------------------------------------------------------------


def test_frozen_is_refused_without_a_pretrained_encoder_and_says_how_to_get_one() -> None:
    with pytest.raises(ConfigError, match="pretrain") as caught:
        parse_modes("fedrep,frozen", encoder_checkpoint=None)
    assert "encoder_checkpoint" in str(caught.value)
    assert parse_modes("fedrep,frozen", encoder_checkpoint="enc/encoder.pt") == ("fedrep", "frozen")
    assert "frozen" not in default_modes(encoder_checkpoint=None)
    assert "frozen" in default_modes(encoder_checkpoint="enc/encoder.pt")
    assert set(default_modes(encoder_checkpoint="x")) == set(COMPARE_MODES)


def test_modes_unknown_or_repeated_are_refused() -> None:
    with pytest.raises(ConfigError, match="--modes"):
        parse_modes("local,sideways", encoder_checkpoint=None)
    with pytest.raises(ConfigError, match="twice"):
        parse_modes("local,local", encoder_checkpoint=None)
    with pytest.raises(ConfigError, match="--modes"):
        parse_modes(" , ", encoder_checkpoint=None)


def test_every_private_mode_gets_the_same_target_epsilon_never_a_fixed_sigma(tmp_path: Path) -> None:
    fixed_sigma = apply_overrides(_config(tmp_path), {"privacy.noise_multiplier": 1.2, "privacy.target_epsilon": None})
    with pytest.raises(ConfigError, match="target"):
        at_target_epsilon(fixed_sigma, None)  # a fixed σ would give fedrep (two phases) a larger ε
    chosen = at_target_epsilon(fixed_sigma, 2.5)
    assert chosen.privacy.target_epsilon == 2.5 and chosen.privacy.noise_multiplier is None
    with pytest.raises(ConfigError, match="target_epsilon"):
        at_target_epsilon(fixed_sigma, 1000.0)  # out of the config's range
    no_dp = apply_overrides(fixed_sigma, {"privacy.enabled": False})
    with pytest.raises(ConfigError, match="privacy.enabled"):
        at_target_epsilon(no_dp, 3.0)


def test_seed_count_is_checked() -> None:
    assert seeds_from(7, 3) == (7, 8, 9)
    for bad in (0, -1, 101):
        with pytest.raises(ConfigError, match="--seeds"):
            seeds_from(0, bad)


# --- the statistics --------------------------------------------------------------------------------


def test_mean_and_95_percent_interval_match_hand_computed_student_t() -> None:
    # 0.80, 0.84, 0.88: mean 0.84, sample sd 0.04, t(0.975, 2) = 4.302653; half-width 4.302653 * 0.04 / sqrt(3)
    mean, half = mean_ci95([0.80, 0.84, 0.88])
    assert mean == pytest.approx(0.84)
    assert half == pytest.approx(4.302653 * 0.04 / math.sqrt(3), rel=1e-6)
    assert mean_ci95([0.7]) == (0.7, None)  # one seed: no interval claimed
    assert mean_ci95([]) == (None, None)


def test_summary_keeps_each_seed_and_reports_the_largest_epsilon_only_for_private_modes() -> None:
    runs = {
        "bank-01": {
            "fedrep": [{"auc": 0.8, "pr_auc": 0.5, "epsilon": 2.98}, {"auc": 0.9, "pr_auc": 0.6, "epsilon": 2.99}],
            "hgb": [{"auc": 0.95, "pr_auc": 0.7, "epsilon": None}, {"auc": 0.97, "pr_auc": 0.8, "epsilon": None}],
        }
    }
    summary = summarise(
        runs,
        modes=("fedrep", "hgb"),
        labels={"fedrep": "fedrep", "hgb": "own gradient-boosted trees (not private)"},
        private={"fedrep": True, "hgb": False},
        target_epsilon=3.0,
        delta=1e-5,
        seeds=(0, 1),
    )
    fedrep = summary["institutions"]["bank-01"]["fedrep"]
    assert fedrep["auc"] == pytest.approx(0.85) and fedrep["auc_per_seed"] == [0.8, 0.9]
    assert fedrep["auc_ci95"] == pytest.approx(12.706205 * 0.0707107 / math.sqrt(2), rel=1e-5)
    assert fedrep["epsilon"] == 2.99
    assert summary["institutions"]["bank-01"]["hgb"]["epsilon"] is None
    table = markdown_table(summary)
    assert "| ε per bank | | | ε ≤ 2.99 | not private |" in table
    assert "0.850 ± 0.635" in table and "upper bound" not in table


# --- a run -----------------------------------------------------------------------------------------


def test_reference_modes_and_baselines_over_two_seeds(tmp_path: Path) -> None:
    config = _config(tmp_path)
    out = tmp_path / "cmp"
    modes = parse_modes("local,centralized,logreg,hgb", encoder_checkpoint=None)
    comparison = run_comparison(config, modes=modes, seeds=(0, 1), target_epsilon=3.0, output_dir=out)
    written = json.loads((out / "comparison.json").read_text())
    assert written["institutions"] == comparison["institutions"]
    assert written["seeds"] == [0, 1] and written["target_epsilon"] == 3.0
    for name, by_mode in written["institutions"].items():
        assert set(by_mode) == set(modes)
        for mode in ("centralized", "logreg", "hgb"):
            assert by_mode[mode]["epsilon"] is None  # not private: no ε claimed
        # local: σ derived for ε = 3 over its own steps, so it spends (almost exactly) the target, at every seed
        assert 2.9 <= by_mode["local"]["epsilon"] <= 3.0
        # the logistic-regression column is scikit-learn's on the same split, seed by seed
        for index, seed in enumerate((0, 1)):
            data = prepare_institution(dataclasses.replace(config, seed=seed), name)
            reference = LogisticRegression(max_iter=5000).fit(data.x_train, data.y_train)
            expected = roc_auc_score(data.y_test, reference.predict_proba(data.x_test)[:, 1])
            assert by_mode["logreg"]["auc_per_seed"][index] == pytest.approx(expected, abs=1e-9)
        assert np.mean(by_mode["logreg"]["auc_per_seed"]) == pytest.approx(by_mode["logreg"]["auc"])
        n = prepare_institution(config, name).y_train.shape[0]
        assert written["sizes"][name]["n_train"] == n
    table = (out / "comparison.md").read_text()
    assert "not private, pooled" in table and "own logistic regression (not private)" in table
    assert "upper bound" not in table
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_local_epsilon_follows_the_accountant_for_the_derived_sigma(tmp_path: Path) -> None:
    """An independent check of local's ε: recompute it from the σ the target implies (RDP, same steps)."""
    from fedchurn.shared.privacy_accounting import noise_multiplier_for

    config = _config(tmp_path)
    comparison = run_comparison(config, modes=("local",), target_epsilon=2.0, output_dir=tmp_path / "cmp")
    for name, by_mode in comparison["institutions"].items():
        n = prepare_institution(config, name).y_train.shape[0]
        # The bank's own plan (training.plan = auto), by hand: B = round(2 sqrt n) within [32, n // 4] here,
        # round(20 / rounds) epochs a round.
        batch = min(max(round(2 * math.sqrt(n)), 32), 1024, n // 4)
        q = sample_rate_for(dataset_size=n, batch_size=batch)
        steps = config.rounds * round(20 / config.rounds) * math.ceil(n / batch)
        sigma = noise_multiplier_for(target_epsilon=2.0, delta=1e-5, sample_rate=q, steps=steps)
        expected = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
        assert by_mode["local"]["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert expected <= 2.0


def test_every_federated_run_of_every_seed_attaches_to_one_ray_at_one_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray starts once for all modes and seeds; each run gets the same target ε and no fixed σ."""
    import fedchurn.comparison.runner as comparison_module
    import fedchurn.simulation.driver as simulation_module
    import fedchurn.simulation.ray_head as ray_head_module

    heads: list[str] = []
    calls: list[tuple[str, int, str | None, float | None, float | None]] = []

    class FakeHead:
        def __init__(self, *, num_cpus: int, log_path: Path) -> None:
            self.address = f"127.0.0.1:{6000 + len(heads)}"

        def __enter__(self) -> FakeHead:
            heads.append(self.address)
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def fake_plan(config: FedChurnConfig) -> FedChurnConfig:
        return config

    def fake_run(plan: FedChurnConfig, *, ray_address: str | None = None, verbose: bool = False) -> dict:
        privacy = plan.privacy
        calls.append((plan.transfer.mode, plan.seed, ray_address, privacy.target_epsilon, privacy.noise_multiplier))
        return {"institutions": {"bank-01": {"auc": 0.7, "pr_auc": 0.4, "epsilon": 2.99, "n_train": 10}}}

    monkeypatch.setattr(ray_head_module, "RayHead", FakeHead)
    # No run folder comes out of the fake simulation: nothing to score on the exact test rows.
    monkeypatch.setattr(
        comparison_module,
        "_exact_metrics",
        lambda config, name: {"auc": 0.7, "pr_auc": 0.4, "epsilon": 2.99, "n_train": 10},
    )
    monkeypatch.setattr(simulation_module, "plan_simulation", fake_plan)
    monkeypatch.setattr(simulation_module, "run_simulation", fake_run)
    config = apply_overrides(_config(tmp_path), {"privacy.noise_multiplier": 1.2, "privacy.target_epsilon": None})
    comparison = run_comparison(
        config, modes=("finetune", "fedrep"), seeds=(0, 1), target_epsilon=3.0, output_dir=tmp_path / "cmp"
    )
    assert heads == ["127.0.0.1:6000"]
    assert sorted((mode, seed) for mode, seed, *_ in calls) == [
        ("fedrep", 0),
        ("fedrep", 1),
        ("finetune", 0),
        ("finetune", 1),
    ]
    assert {(address, target, sigma) for _, _, address, target, sigma in calls} == {("127.0.0.1:6000", 3.0, None)}
    assert comparison["institutions"]["bank-01"]["fedrep"]["auc_per_seed"] == [0.7, 0.7]


@pytest.mark.slow
def test_the_ray_head_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a comparison's Ray head stops: no process of its group, and a plain ray.init() starts afresh."""
    import os
    import subprocess

    import ray

    from fedchurn.simulation.ray_head import RayHead

    default_temp = tmp_path / "ray-default"
    monkeypatch.setenv("RAY_TMPDIR", str(default_temp))
    with RayHead(num_cpus=1, log_path=tmp_path / "head.log") as head:
        group = head._process.pid if head._process is not None else -1
        ray.init(address=head.address, logging_level="ERROR")
        assert ray.cluster_resources().get("CPU") == 1.0
        ray.shutdown()
    listing = subprocess.run(["ps", "-eo", "pgid="], capture_output=True, text=True, check=True).stdout
    assert str(group) not in listing.split()
    assert not (default_temp / "ray" / "ray_current_cluster").exists()
    assert os.environ.get("RAY_ADDRESS") is None
