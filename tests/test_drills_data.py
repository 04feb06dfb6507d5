"""Drill (issue 13): a blank, NaN or inf cell follows data.missing_values; it never drops or retypes a column.

Before the CSV reader's rewrite, one 'NaN' or 'inf' cell in a numeric column made the quick start's schema
inference drop the whole column (exit 0). These tests fail until the reader treats such cells as missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedchurn.schema_inference import infer_schema


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
    from fedchurn.clients.prepared_institution import prepare_institution
    from fedchurn.shared.config import SchemaConfig, default_config
    from fedchurn.shared.errors import FedChurnError

    path = _csv(tmp_path / "customers.csv", bad)
    schema = SchemaConfig(
        label="churn",
        positive="yes",
        numeric=("age", "balance"),
        categorical={"plan": ("basic", "gold")},
        bounds={"age": (18.0, 100.0), "balance": (0.0, 1.0e4)},  # declared bounds are required (no row statistics)
    )
    base = default_config()
    data = dataclasses.replace(base.data, source="csv", schema=schema, institution_files={"bank-a": str(path)})
    imputed = dataclasses.replace(base, data=data)
    prepared = prepare_institution(imputed, "bank-a")  # imputed: every row kept, every value finite
    assert prepared is not None
    assert prepared.missing_imputed == 1 and prepared.rows_dropped == 0
    features = np.concatenate([prepared.x_train, prepared.x_val, prepared.x_test])
    assert len(features) == 40 and np.isfinite(features).all()
    strict = dataclasses.replace(base, data=dataclasses.replace(data, missing_values="error"))
    with pytest.raises(FedChurnError, match="balance"):
        prepare_institution(strict, "bank-a")


# Reader level: the same rule for CSV and Parquet, by hand-counted rows and lines.
_ROWS = "age,balance,plan,churn\n30,100,basic,no\n40,NaN,gold,yes\n50,-inf,basic,no\n60,,gold,yes\n70,500,basic,yes\n"
_NUMERIC_SCHEMA = {"numeric": ("age", "balance"), "categorical": {"plan": ("basic", "gold")}}


def _schema() -> object:
    from fedchurn.shared.config import SchemaConfig

    return SchemaConfig(
        label="churn", positive="yes", bounds={"age": (0.0, 100.0), "balance": (0.0, 1000.0)}, **_NUMERIC_SCHEMA
    )


def _files(tmp_path: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "bank.csv"
    csv_path.write_text(_ROWS)
    parquet = tmp_path / "bank.parquet"
    balance = pa.array([100.0, float("nan"), float("-inf"), None, 500.0], pa.float64())  # stored NaN/inf, a null
    pq.write_table(
        pa.table(
            {
                "age": pa.array([30, 40, 50, 60, 70], pa.int64()),
                "balance": balance,
                "plan": ["basic", "gold", "basic", "gold", "basic"],
                "churn": ["no", "yes", "no", "yes", "yes"],
            }
        ),
        parquet,
    )
    return [csv_path, parquet]


def test_non_finite_cells_are_imputed_dropped_or_refused_like_blank_ones(tmp_path: Path) -> None:
    from fedchurn.shared.errors import DataError
    from fedchurn.shared.institution_file import read_csv_table

    for path in _files(tmp_path):
        imputed = read_csv_table(path, _schema(), institution="a", missing_values="impute")  # type: ignore[arg-type]
        assert imputed.n_rows == 5 and imputed.n_blank == 3, path
        assert imputed.numeric[:, 1].tolist()[0] == 100.0 and imputed.numeric[4, 1] == 500.0
        assert np.isnan(imputed.numeric[1:4, 1]).all()  # NaN, -inf and blank all left for declared imputation
        dropped = read_csv_table(path, _schema(), institution="a", missing_values="drop")  # type: ignore[arg-type]
        assert dropped.line_numbers.tolist() == [2, 6] and dropped.rows_dropped == 3, path
        assert dropped.numeric.tolist() == [[30.0, 100.0], [70.0, 500.0]]
        with pytest.raises(DataError) as info:
            read_csv_table(path, _schema(), institution="a", missing_values="error")  # type: ignore[arg-type]
        message = str(info.value)
        assert (info.value.line, info.value.column) == (3, "balance"), message  # the NaN on line 3, first missing
        assert path.name in message and "line 3" in message and "column 'balance'" in message
        assert "1 blank and 2 non-finite" in message and "impute" in message


def test_a_cell_that_is_no_number_is_still_an_error(tmp_path: Path) -> None:
    from fedchurn.shared.errors import DataError
    from fedchurn.shared.institution_file import read_csv_table

    path = tmp_path / "bank.csv"
    path.write_text(_ROWS.replace("500", "5OO"))  # a typo is no missing value: imputing it would hide it
    with pytest.raises(DataError) as info:
        read_csv_table(path, _schema(), institution="a", missing_values="impute")  # type: ignore[arg-type]
    assert (info.value.line, info.value.column) == (6, "balance") and "'5OO' is not a number" in str(info.value)
    with pytest.raises(DataError, match="numeric except 1 cell"):  # quick start: named as a typo, not retyped
        infer_schema(_csv(tmp_path / "typo.csv", "5O0"), label="churn", positive="yes")


def test_inference_reads_parquet_nan_and_inf_as_missing(tmp_path: Path) -> None:
    csv_path, parquet = _files(tmp_path)
    for path in (csv_path, parquet):
        inferred = infer_schema(path, label="churn", positive="yes", allow_leaky=("plan", "balance", "age"))  # 5 rows
        assert "balance" in inferred.schema.numeric, inferred.report
        assert "balance: numeric (3 blank cell(s) (2 of them NaN or inf)" in "\n".join(inferred.report)
