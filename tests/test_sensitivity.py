"""The one-customer test: DP-SGD's sensitivity (one clipped gradient, norm <= C) must hold for the whole pipeline.

Adding one customer to a bank's CSV and running read -> preprocess -> split -> a full-batch clipped-gradient sum
must leave every other customer's features and split unchanged and move the sum by at most C. Before declared
bounds, the scaling and imputation statistics were fitted on the rows, so one added customer moved every other
customer's features (and the sum by several C).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedchurn.clients.preprocessor import Preprocessor
from fedchurn.clients.splits import split_institution
from fedchurn.shared.config import (
    DataConfig,
    FedChurnConfig,
    ModelConfig,
    SchemaConfig,
    SyntheticConfig,
    config_from_dict,
    config_from_run_config,
    config_to_dict,
    config_to_run_config,
)
from fedchurn.shared.institution_file import read_csv_table
from fedchurn.shared.institution_rows import write_csv
from fedchurn.shared.model import build_model
from fedchurn.shared.raw_table import RawTable
from fedchurn.shared.synthetic_consortium import SYNTHETIC_SCHEMA, generate_synthetic_institution

C = 1.0  # clipping norm

ORDINARY = {"age": "44", "tenure_months": "60", "balance": "12000", "credit_score": "640"}
OUTLIER = {  # far outside every declared bound: the worst case standardisation used to amplify
    "age": "120",
    "tenure_months": "9999",
    "balance": "1e12",
    "credit_score": "-5000",
    "estimated_salary": "1e15",
    "num_products": "40",
    "transactions_last_quarter": "100000",
    "complaints_last_year": "900",
    "days_since_last_login": "",  # blank: imputed with the declared midpoint
    "credit_limit_utilisation": "55",
}


def _bank_csv(tmp_path: Path) -> Path:
    table = generate_synthetic_institution(SyntheticConfig(institutions=1, min_rows=400, max_rows=400), 0, seed=3)
    path = tmp_path / "bank.csv"
    write_csv(table, path)
    return path


def _with_customer(path: Path, values: dict[str, str], label: str) -> Path:
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    header = rows[0]
    row = []
    for column in header:
        if column == SYNTHETIC_SCHEMA.label:
            row.append(label)
        elif column in SYNTHETIC_SCHEMA.categorical:
            row.append(values.get(column, SYNTHETIC_SCHEMA.categorical[column][0]))
        else:
            row.append(values.get(column, "1"))
    out = path.with_name("bank-plus-one.csv")
    with out.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([*rows, row])
    return out


def _read(path: Path) -> RawTable:
    return read_csv_table(path, SYNTHETIC_SCHEMA, institution="bank", missing_values="impute")


def _clipped_gradient_sum(model: nn.Module, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """sum_i clip(grad loss_i, C): what DP-SGD adds noise to, computed one row at a time (independent of our code)."""
    loss_fn = nn.BCEWithLogitsLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(len(y)):
        model.zero_grad()
        loss_fn(model(torch.from_numpy(x[i : i + 1])), torch.from_numpy(y[i : i + 1])).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).double()  # type: ignore[union-attr]
        total += g * min(1.0, C / max(float(g.norm()), 1e-12))
    return total


def _model(input_dim: int) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(), input_dim=input_dim)


@pytest.mark.parametrize("customer", [ORDINARY, OUTLIER], ids=["ordinary", "outlier"])
def test_one_customer_changes_only_its_own_features_and_at_most_c(tmp_path: Path, customer: dict[str, str]) -> None:
    path = _bank_csv(tmp_path)
    before, after = _read(path), _read(_with_customer(path, customer, "yes"))
    assert after.n_rows == before.n_rows + 1
    x_before = Preprocessor.from_schema(before.schema).transform(before)
    x_after = Preprocessor.from_schema(after.schema).transform(after)
    np.testing.assert_array_equal(x_after[:-1], x_before)  # every other customer: bit-identical features
    assert np.abs(x_after[-1]).max() <= 2.0  # the added one is clipped into the declared range
    model = _model(x_before.shape[1])
    assert before.labels is not None and after.labels is not None
    s_before = _clipped_gradient_sum(model, x_before, before.labels.astype(np.float32))
    s_after = _clipped_gradient_sum(model, x_after, after.labels.astype(np.float32))
    assert float((s_after - s_before).norm()) <= C * (1 + 1e-6)


@pytest.mark.parametrize("customer", [ORDINARY, OUTLIER], ids=["ordinary", "outlier"])
def test_one_customer_through_split_moves_training_sum_by_at_most_c(tmp_path: Path, customer: dict[str, str]) -> None:
    path = _bank_csv(tmp_path)
    before, after = _read(path), _read(_with_customer(path, customer, "yes"))
    key = bytes(range(32))  # the bank's secret key (fixed here so the test is repeatable)
    parts_before = split_institution(before, validation_fraction=0.15, test_fraction=0.2, key=key)
    parts_after = split_institution(after, validation_fraction=0.15, test_fraction=0.2, key=key)
    added = int(after.line_numbers[-1])
    for name in ("train", "validation", "test"):
        lines_before = set(getattr(parts_before, name).line_numbers.tolist())
        lines_after = set(getattr(parts_after, name).line_numbers.tolist()) - {added}
        assert lines_after == lines_before, f"{len(lines_after ^ lines_before)} other rows changed {name} part"
    pre = Preprocessor.from_schema(SYNTHETIC_SCHEMA)
    model = _model(len(SYNTHETIC_SCHEMA.feature_names))
    sums = []
    for parts in (parts_before, parts_after):
        train = parts.train
        assert train.labels is not None
        sums.append(_clipped_gradient_sum(model, pre.transform(train), train.labels.astype(np.float32)))
    assert float((sums[1] - sums[0]).norm()) <= C * (1 + 1e-6)


def test_bounds_survive_yaml_and_run_config_round_trips() -> None:
    schema = SchemaConfig(
        label="churn", numeric=("age", "income"), bounds={"age": (18.0, 99.0), "income": (0.0, 5.0e5)}
    )
    config = FedChurnConfig(data=DataConfig(source="csv", csv_path="x.csv", institution_column="b", schema=schema))
    assert config_from_dict(config_to_dict(config)) == config
    restored = config_from_run_config(config_to_run_config(config))
    assert restored.data.schema is not None and restored.data.schema.bounds == {"age": (18.0, 99.0), "income": (0, 5e5)}
    assert restored == config
