"""Drill (issue 13): a blank, NaN or inf cell follows data.missing_values; it never drops or retypes a column.

Before the CSV reader's rewrite, one 'NaN' or 'inf' cell in a numeric column made the quick start's schema
inference drop the whole column (exit 0). These tests fail until the reader treats such cells as missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shared.data import infer_schema


def _csv(path: Path, bad: str) -> Path:
    lines = ["age,balance,plan,churn"]
    for row in range(40):
        balance = bad if row == 7 else f"{1000 + 37 * row}.5"
        lines.append(
            f"{20 + (row * 7) % 45},{balance},{'gold' if row % 3 else 'basic'},{'yes' if row % 4 == 0 else 'no'}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad", ["", "NaN", "nan", "inf", "-inf", "Infinity"])
def test_a_missing_or_non_finite_cell_keeps_the_numeric_column(tmp_path: Path, bad: str) -> None:
    inferred = infer_schema(_csv(tmp_path / "customers.csv", bad), label="churn", positive="yes")
    assert "balance" in inferred.schema.numeric, inferred.report
    assert "balance" not in inferred.schema.categorical


@pytest.mark.parametrize("bad", ["NaN", "inf"])
def test_a_non_finite_cell_follows_missing_values(tmp_path: Path, bad: str) -> None:
    from shared.config import SchemaConfig, default_config
    from shared.data import prepare_institution
    from shared.errors import FedChurnError

    path = _csv(tmp_path / "customers.csv", bad)
    schema = SchemaConfig(
        label="churn", positive="yes", numeric=("age", "balance"), categorical={"plan": ("basic", "gold")}
    )
    base = default_config()
    data = dataclasses.replace(base.data, source="csv", schema=schema, institution_files={"bank-a": str(path)})
    imputed = dataclasses.replace(base, data=data)
    prepared = prepare_institution(imputed, "bank-a")  # imputed: every row kept, every value finite
    assert prepared is not None
    strict = dataclasses.replace(base, data=dataclasses.replace(data, missing_values="error"))
    with pytest.raises(FedChurnError, match="balance"):
        prepare_institution(strict, "bank-a")
