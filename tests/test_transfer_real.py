"""The product claims of transfer learning, measured (slow: Ray Train and several Ray federations).

- synthetic consortium with small banks: a supervised-pretrained encoder, fine-tuned in the federation, beats
  each small bank training alone (same model, same DP, same target ε);
- BankChurners split by Income_Category, at the same target ε for every institution: fedrep is never worse than
  local by more than 0.01 AUC.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedchurn.comparison.runner import run_comparison
from fedchurn.shared.config import SyntheticConfig, apply_overrides, default_config, load_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.xfail(
    strict=False,
    reason="not met: measured at target ε 3, seed 0, each bank planning its own DP-SGD: bank-05 finetune 0.783 "
    "vs local 0.771 (+0.013, the claim is +0.05)",
)
def test_pretrained_transfer_beats_local_for_small_banks(tmp_path: Path) -> None:
    from fedchurn.pretraining.trainer import pretrain_encoder

    base = default_config()
    config = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=6, min_rows=250, max_rows=1500)),
        simulation=dataclasses.replace(base.simulation, ray_num_cpus=2),
    )
    encoder = pretrain_encoder(config, out_dir=tmp_path / "enc").checkpoint
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, encoder_checkpoint=str(encoder)))
    comparison = run_comparison(config, modes=("local", "finetune"), target_epsilon=3.0, output_dir=tmp_path / "cmp")
    by_size = sorted(comparison["institutions"], key=lambda name: comparison["sizes"][name]["n_train"])
    for name in by_size[:3]:  # the three smallest banks (162 to 333 training rows)
        result = comparison["institutions"][name]
        assert 2.9 <= result["local"]["epsilon"] <= 3.0 and 2.9 <= result["finetune"]["epsilon"] <= 3.0
        assert result["finetune"]["auc"] > result["local"]["auc"] + 0.05, (name, result)


@pytest.mark.xfail(
    strict=False,
    reason="not met: the largest institution ('Less than $40K', 2261 training rows) does better alone. Measured "
    "at target ε 3, seed 0: fedrep 0.864 vs local 0.914 (every other institution within 0.01 or better); over "
    "seeds 0-2: fedrep 0.879 ± 0.049 vs local 0.917 ± 0.019 with training.plan auto, 0.885 vs 0.922 with the "
    "config's fixed settings",
)
def test_bankchurners_no_institution_worse_than_local_at_the_same_epsilon(real_data_dir: Path, tmp_path: Path) -> None:
    config = load_config(ROOT / "deploy" / "configs" / "bankchurners.yaml")
    config = apply_overrides(
        config,
        {
            "data.csv_path": str(real_data_dir / "BankChurners.csv"),
            "privacy.noise_multiplier": None,
            "privacy.target_epsilon": 3.0,  # every institution and mode derives σ for this ε over its own steps
            "simulation.ray_num_cpus": 2,
        },
    )
    comparison = run_comparison(config, modes=("local", "fedrep"), output_dir=tmp_path / "cmp")
    for name, result in comparison["institutions"].items():
        assert result["local"]["epsilon"] <= 3.0 and result["fedrep"]["epsilon"] <= 3.0, (name, result)
        assert result["fedrep"]["auc"] >= result["local"]["auc"] - 0.01, (name, result)
