"""Source domain, checkpoint provenance, Ray Train pretraining, and scoring new customers (compare: test_compare.py)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedchurn.clients.evaluation import predict_probabilities
from fedchurn.clients.metrics import risk_deciles
from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.preprocessor import Preprocessor
from fedchurn.comparison.baselines import fresh_model
from fedchurn.pretraining.source_data import load_source, synthetic_source_table
from fedchurn.pretraining.trainer import swap_noise
from fedchurn.scoring import score_customers
from fedchurn.shared.config import FedChurnConfig, SchemaConfig, SyntheticConfig, default_config, dump_config
from fedchurn.shared.errors import CheckpointError, ConfigError, DataError
from fedchurn.shared.institution_rows import write_csv
from fedchurn.shared.model import encoder_arrays, head_state, save_encoder_checkpoint
from fedchurn.shared.provenance import check_schema_metadata, load_checked_encoder, schema_fingerprint, schema_metadata
from fedchurn.shared.synthetic_consortium import SYNTHETIC_SCHEMA, generate_synthetic_institution


def _config(tmp_path: Path, **pretrain) -> FedChurnConfig:
    base = default_config()
    return dataclasses.replace(
        base,
        rounds=2,
        output_dir=str(tmp_path / "run"),
        data=dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=300, max_rows=500)),
        pretrain=dataclasses.replace(base.pretrain, source_rows=600, **pretrain),
        simulation=dataclasses.replace(base.simulation, ray_num_cpus=2),
    )


# --- source data and provenance -------------------------------------------------------------------


def test_synthetic_source_domain_is_seeded_and_holds_no_bank_customer(tmp_path: Path) -> None:
    config = _config(tmp_path)
    first, again = synthetic_source_table(config), synthetic_source_table(config)
    assert first.n_rows == 600 and first.institution == "source"
    np.testing.assert_array_equal(first.numeric, again.numeric)
    bank = generate_synthetic_institution(config.data.synthetic, 0, seed=config.seed)
    source_rows = {tuple(row) for row in first.numeric.tolist()}
    assert not any(tuple(row) in source_rows for row in bank.numeric.tolist())
    rate = first.n_positive / first.n_rows
    assert 0.12 <= rate <= 0.30  # the consortium's churn range (midpoint 0.21 targeted, sampling noise)
    source = load_source(config)
    assert source.x.shape == (600, len(SYNTHETIC_SCHEMA.feature_names)) and source.y is not None
    assert load_source(config).fingerprint == source.fingerprint
    unlabelled = load_source(_config(tmp_path, objective="self_supervised"))
    assert unlabelled.y is None


def test_synthetic_source_needs_the_synthetic_schema(tmp_path: Path) -> None:
    config = _config(tmp_path)
    csv_data = dataclasses.replace(
        config.data, source="csv", csv_path="x.csv", institution_column="bank", schema=SchemaConfig("y", numeric=("a",))
    )
    with pytest.raises(ConfigError, match="pretrain.source"):
        load_source(dataclasses.replace(config, data=csv_data))


def test_schema_fingerprint_mismatch_names_the_features() -> None:
    other = SchemaConfig(label="churned", numeric=("age", "balance"), categorical={"gender": ("F", "M")})
    meta = {"schema": schema_metadata(other, with_label=False)}
    assert schema_fingerprint(other) != schema_fingerprint(SYNTHETIC_SCHEMA)
    with pytest.raises(CheckpointError) as excinfo:
        check_schema_metadata(meta, SYNTHETIC_SCHEMA, path="enc.pt")
    message = str(excinfo.value)
    assert "only in this federation" in message and "'tenure_months'" in message
    check_schema_metadata({"schema": schema_metadata(SYNTHETIC_SCHEMA, with_label=True)}, SYNTHETIC_SCHEMA, path="e")


def test_server_refuses_an_encoder_pretrained_on_other_features(tmp_path: Path) -> None:
    from fedchurn.server.app import initial_encoder

    other = SchemaConfig(label="churned", numeric=("age", "balance"), categorical={"gender": ("F", "M")})
    config = _config(tmp_path)
    model = fresh_model(config, input_dim=len(other.feature_names))
    path = tmp_path / "other.pt"
    save_encoder_checkpoint(
        path,
        encoder_arrays(model),
        model=config.model,
        feature_names=other.feature_names,
        metadata={"schema": schema_metadata(other, with_label=False)},
    )
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, encoder_checkpoint=str(path)))
    with pytest.raises(CheckpointError, match="only in this federation: .*'tenure_months'"):
        initial_encoder(config, SYNTHETIC_SCHEMA.feature_names)


def test_swap_noise_corrupts_about_the_asked_share_with_values_of_the_same_column() -> None:
    x = torch.arange(2000, dtype=torch.float32).reshape(200, 10) * 10 + torch.arange(10)
    corrupted, mask = swap_noise(x, fraction=0.3, generator=torch.Generator().manual_seed(0))
    assert 0.25 < mask.float().mean().item() < 0.35
    assert torch.equal(corrupted[~mask], x[~mask])
    assert torch.equal(corrupted.remainder(10), x.remainder(10))  # each value came from its own column


# --- Ray Train pretraining ------------------------------------------------------------------------


@pytest.mark.slow  # a local Ray and a Ray Train run: about 30 s on 2 cores
def test_pretrain_on_ray_train_writes_a_checked_encoder_with_provenance(tmp_path: Path) -> None:
    from fedchurn.pretraining.trainer import pretrain_encoder

    config = _config(tmp_path, epochs=2, objective="self_supervised")
    result = pretrain_encoder(config, out_dir=tmp_path / "enc")
    meta = json.loads((tmp_path / "enc" / "pretrain.json").read_text())
    assert meta["objective"] == "self_supervised" and meta["source"]["kind"] == "synthetic"
    assert meta["source"]["fingerprint"] == load_source(config).fingerprint
    assert meta["schema"]["fingerprint"] == schema_fingerprint(SYNTHETIC_SCHEMA)
    assert meta["schema"]["label"] is None  # self-supervised: no label learned
    assert meta["metrics"]["epoch"] == 2 and math.isfinite(meta["metrics"]["val_loss"])
    assert meta["workers"]["count"] == 1 and len(meta["workers"]["node_ids"]) == 1
    assert {"torch", "ray", "python"} <= set(meta["versions"])
    assert not (tmp_path / "enc" / "ray-train").exists()
    with_checkpoint = dataclasses.replace(
        config, model=dataclasses.replace(config.model, encoder_checkpoint=str(result.checkpoint))
    )
    arrays = load_checked_encoder(with_checkpoint, SYNTHETIC_SCHEMA.feature_names)
    assert set(arrays) == set(result.arrays)


# --- predict --------------------------------------------------------------------------------------


def _fake_run(tmp_path: Path) -> tuple[Path, FedChurnConfig, torch.nn.Module, Preprocessor]:
    """What a finished run leaves: config.yaml, encoder.pt, and the institution's head and preprocessor."""
    config = _config(tmp_path)
    run = tmp_path / "run"
    data = prepare_institution(config, "bank-02")
    model = fresh_model(config, input_dim=len(data.feature_names))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    home = run / "institutions" / "bank-02"
    home.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(config))
    save_encoder_checkpoint(
        run / "encoder.pt", encoder_arrays(model), model=config.model, feature_names=data.feature_names
    )
    torch.save(head_state(model), home / "head.pt")
    (home / "preprocessor.json").write_text(json.dumps(data.preprocessor.to_dict()))
    return run, config, model, data.preprocessor


def _customers(tmp_path: Path, config: FedChurnConfig) -> Path:
    table = generate_synthetic_institution(config.data.synthetic, 1, seed=99).take(np.arange(40))
    raw = tmp_path / "raw.csv"
    write_csv(table, raw, institution_column="customer_id")
    rows = list(csv.reader(raw.open()))
    for i, row in enumerate(rows[1:]):
        row[0] = f"C{i:04d}"
    path = tmp_path / "customers.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_predict_scores_each_customer_with_the_institutions_model(tmp_path: Path) -> None:
    run, config, model, preprocessor = _fake_run(tmp_path)
    customers = _customers(tmp_path, config)
    result = score_customers(run, "bank-02", customers, tmp_path / "scores.csv")
    assert result.rows == 40 and result.id_column == "customer_id"
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert list(rows[0]) == ["customer_id", "churn_probability", "risk_decile"]
    assert [r["customer_id"] for r in rows] == [f"C{i:04d}" for i in range(40)]
    table = generate_synthetic_institution(config.data.synthetic, 1, seed=99).take(np.arange(40))
    expected = predict_probabilities(model, preprocessor.transform(table))  # independent of the CSV path
    np.testing.assert_allclose([float(r["churn_probability"]) for r in rows], expected, atol=1e-6)
    assert [int(r["risk_decile"]) for r in rows] == risk_deciles(expected).tolist()


def test_predict_errors_are_clear(tmp_path: Path) -> None:
    run, config, _, _ = _fake_run(tmp_path)
    customers = _customers(tmp_path, config)
    with pytest.raises(DataError, match="run folder not found"):
        score_customers(tmp_path / "nope", "bank-02", customers, tmp_path / "s.csv")
    with pytest.raises(DataError, match="no institution named 'bank-09'.*bank-02"):
        score_customers(run, "bank-09", customers, tmp_path / "s.csv")
    with pytest.raises(DataError, match="input file not found"):
        score_customers(run, "bank-02", tmp_path / "missing.csv", tmp_path / "s.csv")
    with pytest.raises(DataError, match="overwrite the input"):
        score_customers(run, "bank-02", customers, customers)
    bad = tmp_path / "bad.csv"
    bad.write_text("age,balance\n40,100\n")
    with pytest.raises(DataError, match="tenure_months"):
        score_customers(run, "bank-02", bad, tmp_path / "s.csv")
