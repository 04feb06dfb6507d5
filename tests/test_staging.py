"""The data stage of a simulation: one read, partitions per institution, removed when the run ends."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.shared.config import SchemaConfig, default_config
from fedchurn.shared.errors import DataError
from fedchurn.shared.institution_rows import read_institution
from fedchurn.shared.partitions import cache_folder
from fedchurn.simulation.driver import discard_plan, plan_simulation

SCHEMA = SchemaConfig(
    label="churn",
    positive="yes",
    numeric=("age", "balance"),
    categorical={"plan": ("a", "b")},
    bounds={"age": (18.0, 100.0), "balance": (0.0, 1.0e6)},
)


def _table(tmp_path: Path) -> Path:
    rows = ["bank,age,balance,plan,churn"]
    for bank in ("x", "y"):
        for r in range(30):
            rows.append(f"{bank},{20 + r},{r * 10.5},{'ab'[r % 2]},{'yes' if r % 3 == 0 else 'no'}")
    path = tmp_path / "pooled.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _config(tmp_path: Path, **data: object):  # type: ignore[no-untyped-def]
    base = default_config()
    values = {"source": "csv", "schema": SCHEMA, **data}
    return dataclasses.replace(base, output_dir=str(tmp_path / "run"), data=dataclasses.replace(base.data, **values))


def test_plan_stages_partitions_that_the_workers_read_and_discard_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _table(tmp_path)
    config = _config(tmp_path, csv_path=str(path), institution_column="bank")
    plan = plan_simulation(config)
    folder = cache_folder(plan.config.output_dir)
    assert plan.institutions == ("x", "y")
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["x", "y"]
    direct = prepare_institution(dataclasses.replace(plan.config, output_dir=str(tmp_path / "elsewhere")), "y")

    def no_second_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the worker read the file again")

    monkeypatch.setattr("fedchurn.clients.prepared_institution.read_institution", no_second_read)
    staged = prepare_institution(plan.config, "y")  # from the staged rows only
    assert np.array_equal(staged.x_train, direct.x_train) and np.array_equal(staged.y_test, direct.y_test)
    path.write_text(path.read_text() + "y,50,1.0,a,no\n")  # a changed file: the staged rows are not used
    with pytest.raises(AssertionError, match="read the file again"):
        prepare_institution(plan.config, "y")
    discard_plan(plan)
    assert not folder.exists()


def test_plan_with_one_file_per_institution(tmp_path: Path) -> None:
    path = _table(tmp_path)
    lines = path.read_text().splitlines()
    files = {}
    for bank in ("x", "y"):
        own = tmp_path / f"{bank}.csv"
        own.write_text("\n".join([lines[0], *[ln for ln in lines[1:] if ln.startswith(bank + ",")]]) + "\n")
        files[bank] = str(own)
    config = _config(tmp_path, institution_files=files)
    plan = plan_simulation(config)
    table = read_institution(plan.config.data, "x", seed=0)
    assert table.n_rows == 30 and table.line_numbers.tolist() == list(range(2, 32))
    discard_plan(plan)


def test_a_bad_cell_stops_planning_with_its_line_and_leaves_nothing_staged(tmp_path: Path) -> None:
    path = _table(tmp_path)
    text = path.read_text().splitlines()
    text[40] = text[40].replace(",b,", ",c,").replace(",a,", ",c,")  # bank y, line 41
    path.write_text("\n".join(text) + "\n")
    config = _config(tmp_path, csv_path=str(path), institution_column="bank")
    with pytest.raises(DataError) as info:
        plan_simulation(config)
    assert (info.value.line, info.value.column) == (41, "plan")
    assert not cache_folder(tmp_path / "run").exists()
