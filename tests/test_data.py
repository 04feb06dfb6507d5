"""The data pipeline: checked CSV reading, synthetic consortium, secret splits, preprocessing, schema inference."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.preprocessor import Preprocessor
from fedchurn.clients.splits import UnbalancedSplitError, split_institution
from fedchurn.schema_inference import infer_schema
from fedchurn.shared.bank_random import derive_seed
from fedchurn.shared.config import DataConfig, FedChurnConfig, SchemaConfig, SyntheticConfig
from fedchurn.shared.errors import ConfigError, DataError
from fedchurn.shared.institution_file import read_csv_table
from fedchurn.shared.institution_rows import institution_names, read_institution, resolve_schema, write_csv
from fedchurn.shared.raw_table import RawTable
from fedchurn.shared.synthetic_consortium import (
    SYNTHETIC_SCHEMA,
    _generate_synthetic,
    generate_synthetic_institution,
    synthetic_profile,
)
from fedchurn.shared.table_checks import LABEL_POSITIVE_DEFAULTS

SCHEMA = SchemaConfig(
    label="churn",
    positive="yes",
    numeric=("age", "balance"),
    categorical={"plan": ("basic", "premium")},
    bounds={"age": (0.0, 100.0), "balance": (0.0, 1000.0)},
)

GOOD = """\
age,balance,plan,churn
30,100.5,basic,no
41,0,premium,yes
25,250,basic,no
"""


def write(tmp_path: Path, text: str, name: str = "bank.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def read(path: Path, schema: SchemaConfig = SCHEMA, **kwargs: object) -> RawTable:
    options: dict[str, object] = {"institution": "a", "missing_values": "error"}
    options.update(kwargs)
    return read_csv_table(path, schema, **options)  # type: ignore[arg-type]


def error_of(path: Path, schema: SchemaConfig = SCHEMA, **kwargs: object) -> DataError:
    with pytest.raises(DataError) as info:
        read(path, schema, **kwargs)
    return info.value


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC (no ties in continuous scores)."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="mergesort")] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def synthetic_table(rows: int = 1000, seed: int = 0) -> RawTable:
    config = SyntheticConfig(institutions=1, min_rows=rows, max_rows=rows)
    return generate_synthetic_institution(config, 0, seed=seed)


# --------------------------------------------------------------------------------------------------
# Reading a good CSV
# --------------------------------------------------------------------------------------------------


def test_read_good_table(tmp_path: Path) -> None:
    table = read(write(tmp_path, GOOD))
    assert table.institution == "a"
    assert table.numeric.dtype == np.float64
    np.testing.assert_array_equal(table.numeric, [[30, 100.5], [41, 0], [25, 250]])
    assert table.categorical.tolist() == [["basic"], ["premium"], ["basic"]]
    assert table.labels is not None and table.labels.tolist() == [0, 1, 0]
    assert table.labels.dtype == np.int64
    assert table.line_numbers.tolist() == [2, 3, 4]
    assert (table.positive_value, table.negative_value) == ("yes", "no")


def test_extra_columns_are_logged_and_dropped_columns_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    schema = SchemaConfig(label="churn", positive="yes", numeric=("age",), drop=("id",))
    path = write(tmp_path, "id,age,notes,churn\n1,30,x,no\n2,40,y,yes\n")
    with caplog.at_level(logging.INFO, logger="fedchurn.shared.data"):
        table = read(path, schema)
    assert table.numeric[:, 0].tolist() == [30, 40]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "notes" in messages and "'id'" not in messages and "id," not in messages


def test_whitespace_bom_blank_lines_and_quoted_newlines(tmp_path: Path) -> None:
    text = '\ufeffage , balance,plan,churn\n30, 1 ,"basic",no\n\n41,2,premium," yes "\n25,3,"basic",no\n'
    table = read(write(tmp_path, text))
    assert table.numeric.tolist() == [[30, 1], [41, 2], [25, 3]]
    assert table.line_numbers.tolist() == [2, 4, 5]
    # a quoted field spanning two lines: the next row's line number still counts physical lines
    schema = SchemaConfig(label="churn", positive="yes", numeric=("age",), drop=("note",))
    path = write(tmp_path, 'age,note,churn\n30,"two\nlines",no\n41,x,yes\n42,oops,maybe\n', "multi.csv")
    error = error_of(path, schema)
    assert error.line == 5 and error.column == "churn"


def test_positive_value_inferred_when_not_declared(tmp_path: Path) -> None:
    schema = SchemaConfig(label="churn", numeric=("age",))
    table = read(write(tmp_path, "age,churn\n1,No\n2,Yes\n3,No\n"), schema)
    assert table.labels is not None and table.labels.tolist() == [0, 1, 0]
    assert (table.positive_value, table.negative_value) == ("Yes", "No")
    table = read(write(tmp_path, "age,churn\n1,0\n2,1\n", "b.csv"), schema)
    assert table.labels is not None and table.labels.tolist() == [0, 1]
    assert "churned" in LABEL_POSITIVE_DEFAULTS
    error = error_of(write(tmp_path, "age,churn\n1,stay\n2,leave\n", "c.csv"), schema)
    assert "'stay'" in str(error) and "'leave'" in str(error) and "data.schema.positive" in str(error)


def test_label_optional_when_not_required(tmp_path: Path) -> None:
    table = read(write(tmp_path, "age,balance,plan\n30,1,basic\n"), require_label=False)
    assert table.labels is None
    table = read(write(tmp_path, "age,balance,plan,churn\n30,1,basic,\n41,2,basic, \n", "b.csv"), require_label=False)
    assert table.labels is None
    # present and filled: still checked, but one class is fine for scoring
    table = read(write(tmp_path, "age,balance,plan,churn\n30,1,basic,no\n", "c.csv"), require_label=False)
    assert table.labels is not None and table.labels.tolist() == [0]


# --------------------------------------------------------------------------------------------------
# Bad CSVs: each names file, line and column
# --------------------------------------------------------------------------------------------------


def test_file_not_found(tmp_path: Path) -> None:
    error = error_of(tmp_path / "nope.csv")
    assert "nope.csv" in str(error) and "not found" in str(error)


def test_folder_instead_of_file(tmp_path: Path) -> None:
    error = error_of(tmp_path)
    assert str(tmp_path) in str(error) and "folder" in str(error)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"age,balance,plan,churn\n30,1,basic,no\n31,1,caf\xe9,no\n")
    error = error_of(path)
    assert error.line == 3 and "UTF-8" in str(error) and "latin.csv" in str(error)


def test_empty_file(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, ""))
    assert "empty" in str(error) and "bank.csv" in str(error)
    error = error_of(write(tmp_path, "\n\n", "blank.csv"))
    assert "empty" in str(error)


def test_header_only(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "age,balance,plan,churn\n"))
    assert "no data rows" in str(error) and "bank.csv" in str(error)


def test_missing_declared_column_suggests_close_match(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "Age,balance,plan,churn\n30,1,basic,no\n"))
    message = str(error)
    assert error.column == "age" and error.line == 1
    assert "did you mean 'Age'" in message and "'balance'" in message and "bank.csv" in message
    error = error_of(write(tmp_path, "age,balance,plan,churned\n30,1,basic,no\n", "b.csv"))
    assert error.column == "churn" and "label" in str(error) and "'churned'" in str(error)
    error = error_of(write(tmp_path, GOOD, "c.csv"), institution_column="branch")
    assert error.column == "branch" and "institution" in str(error)


def test_wrong_number_of_fields(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "age,balance,plan,churn\n30,1,basic,no\n40,1,basic,no,extra\n"))
    assert error.line == 3 and "5 fields" in str(error) and "4" in str(error)


def test_non_numeric_value(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "age,balance,plan,churn\n30,1,basic,no\n40,1.000.000,basic,yes\n"))
    assert (error.line, error.column) == (3, "balance")
    assert "'1.000.000'" in str(error) and "line 3" in str(error) and "column 'balance'" in str(error)
    error = error_of(write(tmp_path, "age,balance,plan,churn\nnan,1,basic,no\n", "b.csv"))
    assert (error.line, error.column) == (2, "age") and "finite" in str(error)


def test_undeclared_category(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "age,balance,plan,churn\n30,1,basic,no\n40,1,gold,yes\n"))
    message = str(error)
    assert (error.line, error.column) == (3, "plan")
    assert "'gold'" in message and "'basic'" in message and "'premium'" in message
    assert "data.schema.categorical.plan" in message


def test_label_with_three_values(tmp_path: Path) -> None:
    schema = SchemaConfig(label="churn", numeric=("age",))
    error = error_of(write(tmp_path, "age,churn\n1,yes\n2,no\n3,maybe\n4,no\n"), schema)
    assert (error.line, error.column) == (4, "churn") and "more than 2" in str(error) and "'maybe'" in str(error)


def test_label_value_neither_positive_nor_other(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "age,balance,plan,churn\n30,1,basic,no\n40,1,basic,yes\n41,1,basic,No\n"))
    assert (error.line, error.column) == (4, "churn")
    assert "'No'" in str(error) and "'yes'" in str(error) and "'no'" in str(error)


def test_positive_value_matched_exactly(tmp_path: Path) -> None:
    schema = SchemaConfig(label="churn", positive="Yes", numeric=("age",))
    error = error_of(write(tmp_path, "age,churn\n1,no\n2,yes\n"), schema)
    assert "did you mean 'yes'" in str(error)


def test_label_with_one_class(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "age,balance,plan,churn\n30,1,basic,no\n40,1,basic,no\n"))
    assert error.column == "churn" and "only one value" in str(error) and "'a'" in str(error)


def test_blank_label_is_always_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "age,balance,plan,churn\n30,1,basic,no\n40,1,basic, \n")
    for policy in ("error", "drop", "impute"):
        error = error_of(path, missing_values=policy)
        assert (error.line, error.column) == (3, "churn") and "blank label" in str(error)


def test_unknown_missing_policy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        read(write(tmp_path, GOOD), missing_values="guess")


# --------------------------------------------------------------------------------------------------
# Missing values: Telco-like " " cells
# --------------------------------------------------------------------------------------------------

BLANKS = """\
age,balance,plan,churn
30,100,basic,no
40," ",premium,yes
50,300,basic,no
60,400,,yes
70,500,premium,no
80,600,basic,yes
"""


def test_missing_policy_error(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, BLANKS), missing_values="error")
    assert (error.line, error.column) == (3, "balance")
    assert "2 blank cell(s)" in str(error) and "bank.csv" in str(error) and "impute" in str(error)


def test_missing_policy_drop(tmp_path: Path) -> None:
    table = read(write(tmp_path, BLANKS), missing_values="drop")
    assert table.n_rows == 4 and table.rows_dropped == 2
    assert table.line_numbers.tolist() == [2, 4, 6, 7]
    assert not np.isnan(table.numeric).any() and table.n_blank == 0
    assert table.labels is not None and table.labels.tolist() == [0, 0, 0, 1]
    error = error_of(write(tmp_path, "age,balance,plan,churn\n30,,basic,no\n", "all.csv"), missing_values="drop")
    assert "none left" in str(error)


def test_missing_policy_impute(tmp_path: Path) -> None:
    table = read(write(tmp_path, BLANKS), missing_values="impute")
    assert table.n_rows == 6 and table.rows_dropped == 0 and table.n_blank == 2
    assert math.isnan(table.numeric[1, 1]) and table.categorical[3, 0] is None
    pre = Preprocessor.from_schema(table.schema)
    x = pre.transform(table)
    assert not np.isnan(x).any()
    assert x[1, 1] == 0.0  # blank balance: the midpoint of the declared [0, 1000], never a statistic of the rows
    assert x[0, 1] == pytest.approx(2 * (2 * 100 / 1000 - 1))  # 100 on [0, 1000] -> -1.6
    assert x[3, 2:].tolist() == [0.0, 0.0]  # blank category: all-zero, not the most frequent value


def test_prepare_institution_counts_imputed_and_dropped(tmp_path: Path) -> None:
    rows = ["age,balance,plan,churn"]
    for i in range(40):
        balance = " " if i in (5, 17) else str(100 + i)
        rows.append(f"{20 + i},{balance},{'basic' if i % 3 else 'premium'},{'yes' if i % 4 == 0 else 'no'}")
    path = write(tmp_path, "\n".join(rows) + "\n")
    cases: tuple[tuple[Literal["impute", "drop"], int, int], ...] = (("impute", 2, 0), ("drop", 0, 2))
    for policy, imputed, dropped in cases:
        data = DataConfig(source="csv", institution_files={"a": str(path)}, schema=SCHEMA, missing_values=policy)
        prepared = prepare_institution(FedChurnConfig(data=data), "a")
        assert (prepared.missing_imputed, prepared.rows_dropped) == (imputed, dropped)
        total = len(prepared.y_train) + len(prepared.y_val) + len(prepared.y_test)
        assert total == 40 - dropped
        assert not np.isnan(prepared.x_train).any()


# --------------------------------------------------------------------------------------------------
# Institutions
# --------------------------------------------------------------------------------------------------

MULTI = """\
branch,age,balance,plan,churn
north,30,1,basic,no
south,31,2,basic,yes
north,32,3,premium,yes
east,33,4,basic,no
north,34,5,basic,no
"""


def test_institution_names_per_source(tmp_path: Path) -> None:
    assert institution_names(DataConfig(), seed=0) == [f"bank-0{i}" for i in range(1, 7)]
    files = DataConfig(source="csv", institution_files={"z": "z.csv", "a": "a.csv"}, schema=SCHEMA)
    assert institution_names(files, seed=0) == ["z", "a"]
    path = write(tmp_path, MULTI)
    table = DataConfig(source="csv", csv_path=str(path), institution_column="branch", schema=SCHEMA)
    assert institution_names(table, seed=0) == ["east", "north", "south"]
    subset = DataConfig(
        source="csv", csv_path=str(path), institution_column="branch", schema=SCHEMA, institutions=("south", "north")
    )
    assert institution_names(subset, seed=0) == ["south", "north"]


def test_institution_names_missing_institution(tmp_path: Path) -> None:
    path = write(tmp_path, MULTI)
    data = DataConfig(
        source="csv", csv_path=str(path), institution_column="branch", schema=SCHEMA, institutions=("north", "west")
    )
    with pytest.raises(DataError) as info:
        institution_names(data, seed=0)
    assert "'west'" in str(info.value) and "'east'" in str(info.value)
    with pytest.raises(DataError, match="bank-09"):
        institution_names(DataConfig(institutions=("bank-01", "bank-09")), seed=0)


def test_institution_values_must_be_folder_safe(tmp_path: Path) -> None:
    path = write(tmp_path, MULTI.replace("east", "east/west"))
    data = DataConfig(source="csv", csv_path=str(path), institution_column="branch", schema=SCHEMA)
    with pytest.raises(DataError) as info:
        institution_names(data, seed=0)
    assert (info.value.line, info.value.column) == (5, "branch")
    blank = write(tmp_path, MULTI.replace("east", " "), "blank.csv")
    with pytest.raises(DataError) as info:
        institution_names(
            DataConfig(source="csv", csv_path=str(blank), institution_column="branch", schema=SCHEMA), seed=0
        )
    assert info.value.line == 5


def test_read_institution_from_table_keeps_only_its_rows(tmp_path: Path) -> None:
    path = write(tmp_path, MULTI)
    data = DataConfig(source="csv", csv_path=str(path), institution_column="branch", schema=SCHEMA)
    table = read_institution(data, "north", seed=0)
    assert table.institution == "north" and table.line_numbers.tolist() == [2, 4, 6]
    assert table.numeric[:, 0].tolist() == [30, 32, 34]
    with pytest.raises(DataError) as info:
        read_institution(data, "west", seed=0)
    assert "'west'" in str(info.value) and "'north'" in str(info.value) and "no rows" in str(info.value)
    # an institution's own check fails on its own rows: 'south' has only churned customers
    with pytest.raises(DataError, match="only one value"):
        read_institution(data, "south", seed=0)


def test_read_institution_from_files_and_synthetic(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    data = DataConfig(source="csv", institution_files={"one": str(path)}, schema=SCHEMA)
    assert read_institution(data, "one", seed=0).n_rows == 3
    with pytest.raises(DataError, match="'two'"):
        read_institution(data, "two", seed=0)
    assert resolve_schema(data) is SCHEMA
    assert resolve_schema(DataConfig()) is SYNTHETIC_SCHEMA
    table = read_institution(DataConfig(), "bank-03", seed=4)
    assert table.institution == "bank-03" and table.schema is SYNTHETIC_SCHEMA
    with pytest.raises(DataError, match="bank-07"):
        read_institution(DataConfig(), "bank-07", seed=0)


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


_KEY = bytes(range(32))


def _coin(key: bytes, table: RawTable, i: int) -> float:
    """The split coin of row i, computed here from its definition: HMAC-SHA256 over the row's canonical JSON."""
    import hashlib
    import hmac
    import json

    numbers = [None if np.isnan(v) else repr(float(v)) for v in table.numeric[i]]
    label = None if table.labels is None else int(table.labels[i])
    row = json.dumps([numbers, list(table.categorical[i]), label], separators=(",", ":"), ensure_ascii=False)
    digest = hmac.new(key, row.encode(), hashlib.sha256).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53


def _parts(split) -> dict[int, int]:
    """CSV line -> part (0 train, 1 validation, 2 test)."""
    return {
        int(line): part for part, p in enumerate((split.train, split.validation, split.test)) for line in p.line_numbers
    }


def test_split_is_a_keyed_coin_per_row_sized_and_disjoint() -> None:
    table = synthetic_table(1000)
    assert table.labels is not None
    split = split_institution(table, validation_fraction=0.15, test_fraction=0.2, key=_KEY)
    parts = (split.train, split.validation, split.test)
    lines = np.concatenate([p.line_numbers for p in parts])
    assert sorted(lines.tolist()) == table.line_numbers.tolist()  # disjoint, covering every row
    by_line = _parts(split)
    for i in range(table.n_rows):  # each row's part is its own coin against the cut points
        u = _coin(_KEY, table, i)
        assert by_line[int(table.line_numbers[i])] == (1 if u < 0.15 else 2 if u < 0.35 else 0)
    for part, fraction in ((split.validation, 0.15), (split.test, 0.2)):
        # Binomial(1000, f): 5 standard deviations
        assert abs(part.n_rows - fraction * 1000) <= 5 * (1000 * fraction * (1 - fraction)) ** 0.5
    assert all(np.all(np.diff(p.line_numbers) > 0) for p in parts)  # file order kept within each part


def test_split_is_secret_keyed_and_stable_per_row() -> None:
    table = synthetic_table(500)
    first = split_institution(table, validation_fraction=0.15, test_fraction=0.2, key=_KEY)
    again = split_institution(table, validation_fraction=0.15, test_fraction=0.2, key=_KEY)
    other = split_institution(table, validation_fraction=0.15, test_fraction=0.2, key=b"\x01" * 32)
    np.testing.assert_array_equal(first.test.line_numbers, again.test.line_numbers)
    np.testing.assert_array_equal(first.train.numeric, again.train.numeric)
    assert not np.array_equal(first.test.line_numbers, other.test.line_numbers)
    # Adding one customer (a new last row) moves no other row; nor does reordering the file.
    assert table.labels is not None
    new_row = table.numeric[:1] + 0.5  # a customer not in the table
    bigger = dataclasses.replace(
        table,
        numeric=np.vstack([table.numeric, new_row]),
        categorical=np.vstack([table.categorical, table.categorical[:1]]),
        labels=np.append(table.labels, 1),
        line_numbers=np.append(table.line_numbers, table.line_numbers.max() + 1),
    )
    grown = _parts(split_institution(bigger, validation_fraction=0.15, test_fraction=0.2, key=_KEY))
    before = _parts(first)
    assert all(grown[line] == part for line, part in before.items())
    order = np.arange(500)[::-1]
    reordered = table.take(order)
    reordered = dataclasses.replace(reordered, line_numbers=table.line_numbers.copy())  # line k now holds row 501-k
    moved = _parts(split_institution(reordered, validation_fraction=0.15, test_fraction=0.2, key=_KEY))
    for k in range(500):
        assert moved[int(table.line_numbers[k])] == before[int(table.line_numbers[order[k]])]


def _tiny(positives: int, negatives: int) -> RawTable:
    n = positives + negatives
    schema = SchemaConfig(label="churn", positive="yes", numeric=("age",))
    return RawTable(
        institution="tiny",
        source="tiny.csv",
        numeric=np.arange(n, dtype=np.float64).reshape(n, 1),
        categorical=np.empty((n, 0), dtype=object),
        labels=np.array([1] * positives + [0] * negatives, dtype=np.int64),
        line_numbers=np.arange(2, n + 2, dtype=np.int64),
        schema=schema,
    )


def test_unbalanced_split_is_an_error_naming_the_fix_never_a_reshuffle() -> None:
    tiny = _tiny(3, 3)
    outcomes = []
    for k in range(40):
        key = bytes([k]) * 32
        expected_ok = True
        for part in range(3):
            labels = [
                int(tiny.labels[i])  # type: ignore[index]
                for i in range(6)
                if (1 if (u := _coin(key, tiny, i)) < 0.15 else 2 if u < 0.35 else 0) == part
            ]
            expected_ok &= 0 < sum(labels) < len(labels)
        try:
            split = split_institution(tiny, validation_fraction=0.15, test_fraction=0.2, key=key)
        except UnbalancedSplitError as error:
            assert "new secret key" in str(error) and "'tiny'" in str(error)
            outcomes.append(False)
        else:
            for part in (split.train, split.validation, split.test):
                assert part.labels is not None and sorted(set(part.labels.tolist())) == [0, 1]
            outcomes.append(True)
        assert outcomes[-1] == expected_ok, k
    assert not all(outcomes), "with 3 + 3 rows some keys must leave a part without a class"


def test_institution_too_small_to_split() -> None:
    with pytest.raises(DataError) as info:
        split_institution(_tiny(2, 50), validation_fraction=0.15, test_fraction=0.2, key=_KEY)
    message = str(info.value)
    assert "'tiny'" in message and "52 rows" in message and "2 churned" in message
    assert "at least 3" in message and "too small to split" in message


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


def _table(ages: list[float], plans: list[str | None], schema: SchemaConfig | None = None) -> RawTable:
    schema = schema or SchemaConfig(
        label="churn",
        positive="yes",
        numeric=("age", "const"),
        categorical={"plan": ("premium", "basic", "gold")},
        bounds={"age": (0.0, 10.0), "const": (5.0, 9.0)},
    )
    n = len(ages)
    return RawTable(
        institution="a",
        source="t.csv",
        numeric=np.column_stack([ages, np.full(n, 7.0)]),
        categorical=np.array(plans, dtype=object).reshape(n, 1),
        labels=np.zeros(n, dtype=np.int64),
        line_numbers=np.arange(2, n + 2, dtype=np.int64),
        schema=schema,
    )


def test_preprocessor_uses_declared_bounds_only() -> None:
    pre = Preprocessor.from_schema(_table([1.0], ["basic"]).schema)
    assert (pre.lows, pre.highs) == ((0.0, 5.0), (10.0, 9.0))
    x = pre.transform(_table([-3.0, 0.0, 2.5, 10.0, 100.0, math.nan], ["basic", "gold", None, "premium", "x", "gold"]))
    assert x.dtype == np.float32 and x.shape == (6, 5)
    # age on [0, 10] -> [-2, 2], clipped outside: -3 -> -2, 2.5 -> -1, 100 -> 2, blank -> 0 (midpoint)
    assert x[:, 0].tolist() == [-2.0, -2.0, -1.0, 2.0, 2.0, 0.0]
    assert x[:, 1].tolist() == [0.0] * 6  # 7 is the midpoint of [5, 9]
    # declared vocabulary order; blank and undeclared 'x' are all-zero
    assert x[:, 2:].tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1]]


def test_preprocessing_is_row_wise() -> None:
    """A row's features never depend on the other rows (no statistic of the bank's data is fitted)."""
    ages = [1.0, 2.0, 3.0, 6.0]
    plans: list[str | None] = ["basic", "gold", None, "premium"]
    pre = Preprocessor.fit(_table(ages, plans))
    alone = np.concatenate([pre.transform(_table([a], [p])) for a, p in zip(ages, plans, strict=True)])
    np.testing.assert_array_equal(pre.transform(_table(ages, plans)), alone)
    with_outlier = pre.transform(_table([*ages, 1e9], [*plans, "gold"]))
    np.testing.assert_array_equal(with_outlier[:4], alone)


def test_numeric_column_without_bounds_is_a_config_error() -> None:
    schema = SchemaConfig(label="churn", numeric=("age", "income"), bounds={"age": (18.0, 99.0)})
    with pytest.raises(ConfigError) as info:
        Preprocessor.from_schema(schema)
    message = str(info.value)
    assert "data.schema.bounds.income" in message and "income" in message and "[low, high]" in message


@pytest.mark.parametrize(
    ("bounds", "rule"),
    [
        ({"age": (5.0, 5.0)}, "low < high"),
        ({"age": (9.0, 1.0)}, "low < high"),
        ({"age": (0.0, math.inf)}, "finite"),
        ({"age": (math.nan, 1.0)}, "finite"),
        ({"plan": (0.0, 1.0)}, "numeric columns only"),
        ({"other": (0.0, 1.0)}, "numeric columns only"),
    ],
)
def test_bounds_validation(bounds: dict[str, tuple[float, float]], rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        SchemaConfig(label="churn", numeric=("age",), categorical={"plan": ("a", "b")}, bounds=bounds)
    assert rule in str(info.value) and "data.schema.bounds." in str(info.value)


def test_one_hot_follows_declared_order() -> None:
    table = _table([1.0, 2.0, 3.0], ["basic", "gold", None])
    pre = Preprocessor.fit(table)
    assert pre.feature_names == ("age", "const", "plan=premium", "plan=basic", "plan=gold")
    x = pre.transform(table)
    assert x[:, 2:].tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 0]]  # None -> all-zero


def test_preprocessor_round_trip_through_json() -> None:
    table = synthetic_table(300)
    pre = Preprocessor.fit(table)
    restored = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert restored == pre
    np.testing.assert_array_equal(restored.transform(table), pre.transform(table))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.pop("schema"), "schema"),
        (lambda d: d["schema"].pop("label"), "schema.label"),
        (lambda d: d["schema"].pop("bounds"), "schema.bounds"),
        (lambda d: d["schema"]["bounds"].pop("age"), "schema.bounds"),
        (lambda d: d["schema"]["bounds"].__setitem__("age", [1.0]), "schema.bounds"),
        (lambda d: d["schema"]["bounds"].__setitem__("age", ["1", 2]), "schema.bounds"),
        (lambda d: d["schema"]["bounds"].__setitem__("age", [3.0, 1.0]), "schema"),
        (lambda d: d["schema"].update(drop=["churned"]), "schema"),
    ],
)
def test_preprocessor_from_malformed_dict(change: object, key: str) -> None:
    d = Preprocessor.fit(synthetic_table(100)).to_dict()
    change(d)  # type: ignore[operator]
    with pytest.raises(DataError) as info:
        Preprocessor.from_dict(d)
    assert f"'{key}'" in str(info.value)


def test_preprocessor_refuses_old_version_and_non_mapping() -> None:
    d = Preprocessor.fit(synthetic_table(100)).to_dict()
    d["version"] = 1
    with pytest.raises(DataError, match="retrain"):
        Preprocessor.from_dict(d)
    with pytest.raises(DataError, match="mapping"):
        Preprocessor.from_dict([1, 2])  # type: ignore[arg-type]


def test_preprocessor_refuses_other_schema() -> None:
    pre = Preprocessor.fit(synthetic_table(100))
    with pytest.raises(DataError, match="different schema"):
        pre.transform(_table([1.0], ["basic"]))


# --------------------------------------------------------------------------------------------------
# The synthetic consortium
# --------------------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_seed_dependent() -> None:
    config = SyntheticConfig()
    a = generate_synthetic_institution(config, 2, seed=7)
    b = generate_synthetic_institution(config, 2, seed=7)
    c = generate_synthetic_institution(config, 2, seed=8)
    np.testing.assert_array_equal(a.numeric, b.numeric)
    np.testing.assert_array_equal(a.categorical, b.categorical)
    assert a.labels is not None and b.labels is not None and c.labels is not None
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.n_rows == c.n_rows  # sizes follow the index, not the seed
    assert not np.array_equal(a.numeric, c.numeric) and not np.array_equal(a.labels, c.labels)
    assert a.institution == "bank-03" and a.source == "synthetic"


def test_generator_values_follow_the_schema() -> None:
    table = synthetic_table(2000)
    assert table.numeric.shape == (2000, len(SYNTHETIC_SCHEMA.numeric)) and not np.isnan(table.numeric).any()
    for j, (column, values) in enumerate(SYNTHETIC_SCHEMA.categorical.items()):
        seen = set(table.categorical[:, j].tolist())
        assert seen <= set(values), column
    columns = {name: table.numeric[:, j] for j, name in enumerate(SYNTHETIC_SCHEMA.numeric)}
    assert columns["age"].min() >= 18 and columns["age"].max() <= 90
    assert set(np.unique(columns["num_products"])) <= {1, 2, 3, 4}
    assert ((columns["credit_limit_utilisation"] >= 0) & (columns["credit_limit_utilisation"] <= 1)).all()
    assert (columns["balance"] == 0).mean() > 0.1  # many customers hold no balance
    tiers = table.categorical[:, list(SYNTHETIC_SCHEMA.categorical).index("card_tier")]
    assert (tiers == "blue").mean() > 0.5 and (tiers == "platinum").mean() < 0.1  # unbalanced, as in real banks


def test_generator_sizes_and_churn_rates() -> None:
    config = SyntheticConfig()
    for seed in (0, 1, 2):
        tables = [generate_synthetic_institution(config, i, seed=seed) for i in range(config.institutions)]
        sizes = [t.n_rows for t in tables]
        assert sizes[0] == config.max_rows and sizes[-1] == config.min_rows
        assert sizes == sorted(sizes, reverse=True)
        targets = [synthetic_profile(config, i, seed=seed).churn_rate for i in range(config.institutions)]
        rates = [t.n_positive / t.n_rows for t in tables]
        assert all(config.churn_rate_min <= r <= config.churn_rate_max for r in targets)
        for rate, target in zip(rates, targets, strict=True):
            assert abs(rate - target) < 0.06
        assert abs(np.mean(rates) - np.mean(targets)) < 0.02


def test_generator_signal_strength() -> None:
    config = SyntheticConfig()
    scores = []
    for seed in (0, 1):
        for i in range(config.institutions):
            table, probability = _generate_synthetic(config, i, seed=seed)
            assert table.labels is not None
            scores.append(auc(table.labels, probability))
    assert 0.8 <= float(np.mean(scores)) <= 0.9


def test_generator_is_learnable_by_logistic_regression() -> None:
    prepared = prepare_institution(FedChurnConfig(), "bank-01")
    x = np.column_stack([prepared.x_train, np.ones(len(prepared.x_train))]).astype(np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(300):
        w -= 0.5 * x.T @ (1 / (1 + np.exp(-x @ w)) - prepared.y_train) / len(x)
    x_test = np.column_stack([prepared.x_test, np.ones(len(prepared.x_test))])
    assert auc(prepared.y_test, x_test @ w) > 0.75


def test_generator_is_fast() -> None:
    config = SyntheticConfig(institutions=1, min_rows=3000, max_rows=3000)
    timings = []
    for seed in range(5):
        start = time.perf_counter()
        generate_synthetic_institution(config, 0, seed=seed)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.05


def test_write_csv_round_trip(tmp_path: Path) -> None:
    table = generate_synthetic_institution(SyntheticConfig(), 4, seed=3)
    path = tmp_path / "out" / "bank-05.csv"
    write_csv(table, path)
    back = read_csv_table(path, SYNTHETIC_SCHEMA, institution="bank-05", missing_values="error")
    np.testing.assert_array_equal(back.numeric, table.numeric)
    np.testing.assert_array_equal(back.categorical, table.categorical)
    assert back.labels is not None and table.labels is not None
    np.testing.assert_array_equal(back.labels, table.labels)
    np.testing.assert_array_equal(back.line_numbers, table.line_numbers)
    with path.open(newline="") as handle:
        header = next(csv.reader(handle))
    assert header[-1] == "churned" and header[0] == "age"


def test_write_csv_round_trip_with_blanks_and_institution_column(tmp_path: Path) -> None:
    table = read(write(tmp_path, BLANKS), missing_values="impute")
    path = tmp_path / "again.csv"
    write_csv(table, path, institution_column="branch")
    back = read_csv_table(path, SCHEMA, institution="a", missing_values="impute", institution_column="branch")
    np.testing.assert_array_equal(back.numeric, table.numeric)  # NaN in the same places
    assert back.categorical.tolist() == table.categorical.tolist()
    assert back.labels is not None and table.labels is not None
    assert back.labels.tolist() == table.labels.tolist()


# --------------------------------------------------------------------------------------------------
# prepare_institution and seeds
# --------------------------------------------------------------------------------------------------


def test_prepare_synthetic_institution() -> None:
    config = FedChurnConfig()
    prepared = prepare_institution(config, "bank-06")
    assert prepared.name == "bank-06" and prepared.feature_names == SYNTHETIC_SCHEMA.feature_names
    n = config.data.synthetic.min_rows
    assert len(prepared.y_train) + len(prepared.y_val) + len(prepared.y_test) == n
    for x, y in ((prepared.x_train, prepared.y_train), (prepared.x_val, prepared.y_val)):
        assert x.dtype == np.float32 and y.dtype == np.float32 and x.shape == (len(y), len(prepared.feature_names))
        assert set(np.unique(y).tolist()) == {0.0, 1.0}
    k = len(SYNTHETIC_SCHEMA.numeric)
    assert np.abs(prepared.x_train[:, :k]).max() <= 2.0  # clipped to the declared bounds, scaled to [-2, 2]
    assert np.abs(prepared.x_test[:, :k]).max() <= 2.0
    again = prepare_institution(config, "bank-06")
    np.testing.assert_array_equal(prepared.x_test, again.x_test)
    assert (prepared.missing_imputed, prepared.rows_dropped) == (0, 0)


def test_derive_seed_is_stable() -> None:
    assert derive_seed(0) == 1738496668  # fixed across machines and Python runs (never hash())
    assert derive_seed("split", 0, "bank-01") == 2117213970
    assert derive_seed(1) != derive_seed("1")
    assert derive_seed("ab", "c") != derive_seed("a", "bc")
    assert all(0 <= derive_seed(i) < 2**31 for i in range(100))
    with pytest.raises(TypeError):
        derive_seed(1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Schema inference
# --------------------------------------------------------------------------------------------------


def _inference_table(tmp_path: Path, labels: tuple[str, str] = ("Yes", "No")) -> Path:
    rows = ["CustomerId,ref,age,balance,visits,gender,branch,notes,Exited,leak"]
    for i in range(60):
        rows.append(
            ",".join(
                [
                    str(500_000 + 37 * i),  # unique integers named like an id
                    f"R-{i:04d}",  # unique text
                    str(20 + i % 30),
                    "" if i == 7 else f"{i * 10.5:.1f}",
                    str(5 + 13 * i),  # unique integers, but not an identifier: kept
                    "F" if i % 2 else "M",
                    ("east", "west", "north")[i % 3],
                    "",
                    labels[0] if i % 4 == 0 else labels[1],
                    str(i % 2),
                ]
            )
        )
    return write(tmp_path, "\n".join(rows) + "\n", "infer.csv")


def test_infer_schema_types_and_identifiers(tmp_path: Path) -> None:
    inferred = infer_schema(_inference_table(tmp_path), label="Exited", institution_column="branch", drop=["leak"])
    schema = inferred.schema
    assert schema.label == "Exited" and schema.positive == "Yes"
    assert schema.numeric == ("age", "balance", "visits")
    assert schema.categorical == {"gender": ("F", "M")}
    assert set(schema.drop) == {"CustomerId", "ref", "notes", "leak"}
    report = "\n".join(inferred.report)
    assert "CustomerId: dropped (looks like an identifier: 60 unique integers)" in report
    assert "ref: dropped (looks like an identifier" in report
    assert "gender: categorical (2 values)" in report and "age: numeric" in report
    assert "balance: numeric (1 blank cell(s))" in report
    assert "branch: institution column (3 institutions)" in report
    assert "leak: dropped (as asked)" in report and "notes: dropped" in report
    kept = infer_schema(_inference_table(tmp_path), label="Exited", keep=["CustomerId"], drop=["leak"]).schema
    assert "CustomerId" in kept.numeric and "branch" in kept.categorical


def test_inferred_schema_reads_its_file(tmp_path: Path) -> None:
    path = _inference_table(tmp_path)
    schema = infer_schema(path, label="Exited", institution_column="branch").schema
    data = DataConfig(source="csv", csv_path=str(path), institution_column="branch", schema=schema)
    assert institution_names(data, seed=0) == ["east", "north", "west"]
    table = read_institution(data, "east", seed=0)
    assert table.n_rows == 20 and table.n_blank == 0


def test_infer_schema_positive_value(tmp_path: Path) -> None:
    path = _inference_table(tmp_path, labels=("left", "stayed"))
    with pytest.raises(DataError) as info:
        infer_schema(path, label="Exited")
    assert "'left'" in str(info.value) and "'stayed'" in str(info.value) and "--positive" in str(info.value)
    assert infer_schema(path, label="Exited", positive="left").schema.positive == "left"
    with pytest.raises(DataError) as info:
        infer_schema(path, label="Exited", positive="gone")
    assert "'gone'" in str(info.value) and "'left'" in str(info.value) and "'stayed'" in str(info.value)


def test_infer_schema_label_must_be_binary(tmp_path: Path) -> None:
    path = write(tmp_path, "age,churn\n1,a\n2,b\n3,c\n")
    with pytest.raises(DataError) as info:
        infer_schema(path, label="churn")
    assert "exactly 2" in str(info.value) and info.value.line == 4
    with pytest.raises(DataError, match="did you mean 'churn'"):
        infer_schema(path, label="Churn")
    with pytest.raises(DataError, match="--drop"):
        infer_schema(path, label="churn", drop=["nope"])


# --------------------------------------------------------------------------------------------------
# Real data (skipped when ../shared/data is absent)
# --------------------------------------------------------------------------------------------------


def _real_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


def _with_bounds(schema: SchemaConfig) -> SchemaConfig:
    """Preprocessing needs declared bounds: keep any the inference declared, a wide range for the rest."""
    bounds = {c: schema.bounds.get(c, (0.0, 1.0e6)) for c in schema.numeric}
    return dataclasses.replace(schema, bounds=bounds)


def test_real_bank_churners(real_data_dir: Path) -> None:
    path = _real_file(real_data_dir, "BankChurners.csv")
    with path.open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle))
    leaky = [h for h in header if h.startswith("Naive_Bayes_Classifier_")]
    assert len(leaky) == 2
    with pytest.raises(DataError) as info:
        infer_schema(path, label="Attrition_Flag", institution_column="Income_Category", drop=leaky)
    assert "'Attrited Customer'" in str(info.value) and "--positive" in str(info.value)
    inferred = infer_schema(
        path, label="Attrition_Flag", positive="Attrited Customer", institution_column="Income_Category", drop=leaky
    )
    schema = _with_bounds(inferred.schema)
    assert set(schema.drop) == {"CLIENTNUM", *leaky}
    assert "Income_Category" not in schema.categorical and "Attrition_Flag" not in schema.numeric
    assert schema.categorical["Card_Category"] == ("Blue", "Gold", "Platinum", "Silver")
    assert "Unknown" in schema.categorical["Education_Level"]
    assert any("CLIENTNUM: dropped (looks like an identifier: 10127 unique integers)" in r for r in inferred.report)
    assert any("1627 of 10127 rows" in r for r in inferred.report)

    config = FedChurnConfig(
        data=DataConfig(source="csv", csv_path=str(path), institution_column="Income_Category", schema=schema)
    )
    names = institution_names(config.data, seed=0)
    assert len(names) == 6 and "$120K +" in names and "Less than $40K" in names
    rows = positives = 0
    for name in names:
        table = read_institution(config.data, name, seed=0)
        rows += table.n_rows
        positives += table.n_positive
        if name == "Less than $40K":
            assert table.n_rows == 3561
        if name == "$120K +":
            assert table.n_rows == 727
        prepared = prepare_institution(config, name)
        assert len(prepared.y_train) + len(prepared.y_val) + len(prepared.y_test) == table.n_rows
        assert prepared.x_train.shape[1] == len(schema.feature_names)
        assert not np.isnan(prepared.x_train).any()
    assert (rows, positives) == (10127, 1627)


def test_real_telco(real_data_dir: Path) -> None:
    path = _real_file(real_data_dir, "Telco-Customer-Churn.csv")
    inferred = infer_schema(path, label="Churn", institution_column="Contract")
    schema = _with_bounds(inferred.schema)
    assert schema.positive == "Yes" and "customerID" in schema.drop
    assert "TotalCharges" in schema.numeric and "SeniorCitizen" in schema.numeric
    assert any(r.startswith("customerID: dropped (looks like an identifier") for r in inferred.report)

    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        column = next(reader).index("TotalCharges")
        first_blank = next(i for i, row in enumerate(reader, start=2) if not row[column].strip())

    def single(policy: Literal["error", "drop", "impute"]) -> DataConfig:
        return DataConfig(source="csv", institution_files={"telco": str(path)}, schema=schema, missing_values=policy)

    with pytest.raises(DataError) as info:
        read_institution(single("error"), "telco", seed=0)
    assert (info.value.line, info.value.column) == (first_blank, "TotalCharges")
    assert "11 blank cell(s)" in str(info.value)
    table = read_institution(single("impute"), "telco", seed=0)
    assert (table.n_rows, table.n_positive, table.n_blank) == (7043, 1869, 11)
    prepared = prepare_institution(FedChurnConfig(data=single("impute")), "telco")
    assert prepared.missing_imputed == 11 and not np.isnan(prepared.x_train).any()
    prepared = prepare_institution(FedChurnConfig(data=single("drop")), "telco")
    assert prepared.rows_dropped == 11
    assert len(prepared.y_train) + len(prepared.y_val) + len(prepared.y_test) == 7043 - 11

    by_contract = DataConfig(source="csv", csv_path=str(path), institution_column="Contract", schema=schema)
    for name in institution_names(by_contract, seed=0):
        prepare_institution(FedChurnConfig(data=by_contract), name)


# --------------------------------------------------------------------------------------------------
# Columnar reading, staged partitions, and inference a user can trust
# --------------------------------------------------------------------------------------------------


def _pooled(tmp_path: Path, *, banks: int = 3, rows: int = 40, extra: str = "") -> Path:
    rng = np.random.default_rng(0)
    lines = ["bank,age,balance,plan,churn" + (",note" if extra else "")]
    for b in range(banks):
        for r in range(rows):
            churn = "yes" if r % 4 == 0 else "no"
            cells = [f"b{b}", str(20 + r), f"{rng.uniform(0, 1000):.2f}", ("basic", "premium")[r % 2], churn]
            if extra:
                cells.append(f"{extra}{b}-{r}")
            lines.append(",".join(cells))
    return write(tmp_path, "\n".join(lines) + "\n", "pooled.csv")


def test_parquet_reads_like_csv(tmp_path: Path) -> None:
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    path = _pooled(tmp_path)
    parquet = tmp_path / "pooled.parquet"
    pq.write_table(pa_csv.read_csv(path), parquet)  # typed columns: int, float, text
    data_csv = DataConfig(source="csv", csv_path=str(path), institution_column="bank", schema=SCHEMA)
    data_pq = DataConfig(source="csv", csv_path=str(parquet), institution_column="bank", schema=SCHEMA)
    assert institution_names(data_pq, seed=0) == ["b0", "b1", "b2"]
    a, b = read_institution(data_csv, "b1", seed=0), read_institution(data_pq, "b1", seed=0)
    assert np.array_equal(a.numeric, b.numeric) and np.array_equal(a.labels, b.labels)
    assert a.categorical.tolist() == b.categorical.tolist()
    assert a.line_numbers.tolist() == list(range(42, 82))  # header line 1, bank b1 on lines 42..81
    assert b.line_numbers.tolist() == list(range(42, 82))  # Parquet row r reported as line r + 2
    from_csv = infer_schema(path, label="churn", institution_column="bank").schema
    from_parquet = infer_schema(parquet, label="churn", institution_column="bank").schema
    assert from_parquet == from_csv and from_csv.numeric == ("age", "balance")


def test_line_numbers_count_blank_lines_crlf_and_quoted_newlines(tmp_path: Path) -> None:
    crlf = write(tmp_path, "age,balance,plan,churn\r\n30,1,basic,no\r\n\r\n41,x,premium,yes\r\n", "crlf.csv")
    assert (error_of(crlf).line, error_of(crlf).column) == (4, "balance")
    quoted = write(
        tmp_path, 'age,balance,plan,churn,note\n30,1,basic,no,a\n41,2,premium,yes,"x\ny"\n25,y,basic,no,b\n', "q.csv"
    )
    assert error_of(quoted).line == 5  # the quoted note on line 3 spans lines 3-4


def test_staged_partitions_equal_direct_reads_and_are_removed(tmp_path: Path) -> None:
    from fedchurn.shared.partitions import cache_folder, load_partition, remove_partitions, stage_partitions

    path = _pooled(tmp_path)
    data = DataConfig(source="csv", csv_path=str(path), institution_column="bank", schema=SCHEMA)
    staged = stage_partitions(data, tmp_path / "run")
    assert staged.institutions == ("b0", "b1", "b2") and staged.rows == 120
    for name in staged.institutions:
        cached = load_partition(data, tmp_path / "run", name)
        direct = read_institution(data, name, seed=0)
        assert cached is not None
        assert np.array_equal(cached.numeric, direct.numeric) and np.array_equal(cached.labels, direct.labels)
        assert cached.categorical.tolist() == direct.categorical.tolist()
        assert cached.line_numbers.tolist() == direct.line_numbers.tolist()
        # One institution's folder holds only its own rows.
        lines = np.load(cache_folder(tmp_path / "run") / name / "lines.npy")
        assert set(lines.tolist()) == set(direct.line_numbers.tolist())
    assert institution_names(data, seed=0, output_dir=str(tmp_path / "run")) == ["b0", "b1", "b2"]
    path.write_text(path.read_text() + "b0,50,1,basic,no\n")  # the file changed: the cache is not used
    assert load_partition(data, tmp_path / "run", "b0") is None
    remove_partitions(tmp_path / "run")
    assert not cache_folder(tmp_path / "run").exists()


def test_staging_reports_the_first_error_like_a_direct_read(tmp_path: Path) -> None:
    from fedchurn.shared.partitions import stage_partitions

    path = _pooled(tmp_path)
    lines = path.read_text().splitlines()
    lines[60] = lines[60].replace("premium", "gold").replace("basic", "gold")  # bank b1, line 61
    lines[100] = lines[100].replace(",yes", ",").replace(",no", ",")  # bank b2, line 101: blank label
    path.write_text("\n".join(lines) + "\n")
    data = DataConfig(source="csv", csv_path=str(path), institution_column="bank", schema=SCHEMA)
    with pytest.raises(DataError) as staged:
        stage_partitions(data, tmp_path / "run")
    with pytest.raises(DataError) as direct:
        read_institution(data, "b1", seed=0)
    assert str(staged.value) == str(direct.value)
    assert (staged.value.line, staged.value.column) == (61, "plan")


def test_inference_names_typo_cells_in_a_numeric_column(tmp_path: Path) -> None:
    path = _pooled(tmp_path)
    lines = path.read_text().splitlines()
    lines[11] = lines[11].replace(lines[11].split(",")[2], "5O0")  # a letter O for a zero
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        infer_schema(path, label="churn", institution_column="bank")
    assert (info.value.line, info.value.column) == (12, "balance")
    assert "'5O0' on line 12" in str(info.value) and "1 cell(s)" in str(info.value)


def test_inference_drops_free_text_and_warns(tmp_path: Path) -> None:
    inferred = infer_schema(_pooled(tmp_path, extra="note "), label="churn", institution_column="bank")
    assert "note" in inferred.schema.drop and "note" not in inferred.schema.categorical
    assert (
        len(inferred.warnings) == 1 and "note: dropped (looks like an identifier or free text" in inferred.warnings[0]
    )


def test_inferred_vocabulary_keeps_only_values_of_two_or_more_institutions(tmp_path: Path) -> None:
    path = _pooled(tmp_path)
    lines = path.read_text().splitlines()
    lines[5] = lines[5].replace("premium", "Smith").replace("basic", "Smith")  # only bank b0 has it
    path.write_text("\n".join(lines) + "\n")
    schema = infer_schema(path, label="churn", institution_column="bank").schema
    assert schema.categorical["plan"] == ("basic", "premium", "(other)")
    assert "Smith" not in json.dumps(schema.categorical)
    data = DataConfig(source="csv", csv_path=str(path), institution_column="bank", schema=schema)
    table = read_institution(data, "b0", seed=0)
    assert table.categorical[4, 0] == "(other)"  # line 6 is b0's 5th row


def test_inference_flags_a_label_leaking_column(tmp_path: Path) -> None:
    path = _pooled(tmp_path)
    lines = path.read_text().splitlines()
    lines[0] += ",score"
    for i in range(1, len(lines)):
        lines[i] += ",0.97" if lines[i].endswith("yes") else f",0.0{i % 9}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        infer_schema(path, label="churn", institution_column="bank")
    assert (
        "'score'" in str(info.value) and "--allow-leaky score" in str(info.value) and "--drop score" in str(info.value)
    )
    allowed = infer_schema(path, label="churn", institution_column="bank", allow_leaky=["score"]).schema
    assert "score" in allowed.numeric
    assert "score" in infer_schema(path, label="churn", institution_column="bank", drop=["score"]).schema.drop


def test_inferred_bounds_are_rounded_outward_percentiles(tmp_path: Path) -> None:
    path = _pooled(tmp_path)
    schema = infer_schema(path, label="churn", institution_column="bank").schema
    # age runs 20..59 in every bank: 1st percentile 20.39 -> 20; 99th 59 - 0.39 = 58.61 -> 59.
    assert schema.bounds["age"] == (20.0, 59.0)
    from fedchurn.schema_inference import propose_bounds

    # By hand: 1st percentile 0.0123 + 0.02 * 0.4877 = 0.02205 -> 0.022; 99th 0.5 + 0.98 * 986.5 = 967.3 -> 970.
    assert propose_bounds(np.array([0.0123, 0.5, 987.0])) == (0.022, 970.0)
    assert propose_bounds(np.array([5.0, 5.0, 5.0])) == (5.0, 6.0)  # a constant column still gets a range


def test_inferred_bounds_survive_save_config(tmp_path: Path) -> None:
    from fedchurn.shared.config import dump_config, load_config

    schema = infer_schema(_pooled(tmp_path), label="churn", institution_column="bank").schema
    config = FedChurnConfig(
        data=DataConfig(source="csv", csv_path=str(tmp_path / "pooled.csv"), institution_column="bank", schema=schema)
    )
    saved = tmp_path / "run.yaml"
    saved.write_text(dump_config(config))
    loaded = load_config(saved)
    assert loaded.data.schema is not None and loaded.data.schema.bounds == schema.bounds
    assert loaded.data.schema.bounds["age"] == (20.0, 59.0)
