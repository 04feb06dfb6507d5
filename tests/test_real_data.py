"""The product on real public churn tables (skipped when the data folder is absent)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedchurn.shared.config import FedChurnConfig, apply_overrides, load_config
from fedchurn.simulation.driver import plan_simulation, run_simulation

CONFIGS = Path(__file__).resolve().parents[1] / "deploy" / "configs"
TABLES = {"bankchurners.yaml": "BankChurners.csv", "telco.yaml": "Telco-Customer-Churn.csv"}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_example_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.data.source == "csv" and config.data.schema is not None


@pytest.mark.parametrize(("name", "institutions"), [("bankchurners.yaml", 6), ("telco.yaml", 3)])
def test_every_institution_passes_the_checks(real_data_dir: Path, tmp_path: Path, name: str, institutions: int) -> None:
    config = apply_overrides(
        load_config(CONFIGS / name),
        {"data.csv_path": str(real_data_dir / TABLES[name]), "output_dir": str(tmp_path)},
    )
    plan = plan_simulation(config)  # reads, checks, splits and preprocesses every institution
    assert len(plan.institutions) == institutions


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TABLES))
def test_federation_on_real_data(real_data_dir: Path, tmp_path: Path, name: str) -> None:
    config = apply_overrides(
        load_config(CONFIGS / name),
        {"data.csv_path": str(real_data_dir / TABLES[name]), "output_dir": str(tmp_path)},
    )
    config = dataclasses.replace(config, simulation=dataclasses.replace(config.simulation, ray_num_cpus=2))
    summary = run_simulation(plan_simulation(config))
    for institution, metrics in summary["institutions"].items():
        # What the server sees is a DP-noised histogram; the quality bar is the bank's own exact view of the model
        # it keeps, on its own (secretly split) test rows.
        assert _kept_model_auc(tmp_path, config, institution) > 0.65, institution
        assert 0 < metrics["epsilon"] < 10


def _kept_model_auc(out: Path, config: FedChurnConfig, institution: str) -> float:
    import torch

    from fedchurn.clients.evaluation import predict_logits
    from fedchurn.clients.metrics import roc_auc
    from fedchurn.clients.prepared_institution import prepare_institution
    from fedchurn.shared.bank_random import bank_secret_key
    from fedchurn.shared.model import build_model

    home = out / "institutions" / institution
    key, created = bank_secret_key(home)
    assert not created, "the bank's key is in its folder"
    data = prepare_institution(config, institution, split_key=key)
    model = build_model(config.model, input_dim=len(data.feature_names))
    model.load_state_dict(torch.load(home / "kept-model.pt", weights_only=True))
    return roc_auc(data.y_test, predict_logits(model, data.x_test).numpy())
