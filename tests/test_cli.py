"""The `fedchurn` command as a user meets it: exit codes, one-line errors, the quick start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedchurn.cli.main import main
from fedchurn.shared.config import load_config


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def _good_csv(tmp_path: Path) -> Path:
    rows = ["customer_id,age,region,churn,bank"]
    for i in range(60):
        bank = "north-bank" if i % 2 else "south-bank"
        rows.append(f"{1000 + i},{20 + i % 40},{'city' if i % 3 else 'rural'},{'yes' if i % 5 == 0 else 'no'},{bank}")
    return _csv(tmp_path / "customers.csv", rows)


def test_bad_config_exits_2_with_key_value_rule_and_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("rounds: 3\nprivacy:\n  delta: 1e-5\n")
    result = subprocess.run(
        [sys.executable, "-m", "fedchurn.cli.main", "simulate", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "config key 'privacy.delta' = '1e-5': must be a number" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "--rounds", "0"], "config key 'rounds' = 0: must be 1..100000"),
        (["simulate", "--set", "privacy.delta=abc"], "config key 'privacy.delta' = 'abc': must be a number"),
        (["simulate", "--set", "training.batch_sise=3"], "'training.batch_sise' = 3: unknown key"),
        (["simulate", "--set", "rounds"], "must look like key=value"),
        (["simulate", "missing.yaml"], "config file not found"),
        (["simulate", "--label", "churn"], "need --data FILE.csv"),
        (["simulate", "--data", "x.csv"], "also needs --label and --institution-column"),
    ],
)
def test_user_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("error: ")


def test_bad_csv_is_named_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _csv(tmp_path / "bad.csv", ["age,churn,bank", *[f"{i},{'yes' if i % 4 else 'no'},a" for i in range(20)]])
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data:\n  source: csv\n  csv_path: {path}\n  institution_column: bank\n"
        "  schema: {label: churn, numeric: [age, income]}\n"
    )
    assert main(["simulate", str(config), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "'income'" in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_quick_start_infers_prints_and_saves_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _good_csv(tmp_path)
    saved = tmp_path / "run.yaml"
    argv = [
        "simulate", "--data", str(data), "--label", "churn", "--institution-column", "bank",
        "--drop", "customer_*", "--save-config", str(saved), "--out", str(tmp_path / "out"), "--dry-run",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "age: numeric" in out
    assert "region: categorical (2 values)" in out
    assert "customer_id: dropped" in out
    assert "Institutions: north-bank, south-bank" in out
    config = load_config(saved)
    assert config.data.schema is not None
    assert config.data.schema.numeric == ("age",)
    assert config.data.schema.categorical == {"region": ("city", "rural")}
    assert config.data.schema.positive == "yes"
    # The saved config runs as it is.
    assert main(["simulate", str(saved), "--dry-run"]) == 0


def test_drop_pattern_that_matches_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _good_csv(tmp_path)
    argv = ["simulate", "--data", str(data), "--label", "churn", "--institution-column", "bank", "--drop", "zz*"]
    assert main(argv) == 2
    assert "'zz*': matches no column" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "summary.json").write_text("{}")
    assert main(["simulate", "--out", str(tmp_path), "--dry-run"]) == 2
    assert "already holds an earlier run" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == "{}"
    assert main(["simulate", "--out", str(tmp_path), "--dry-run", "--overwrite"]) == 0


def test_config_show_is_the_default(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["config", "show"]) == 0
    shown = tmp_path / "shown.yaml"
    shown.write_text(capsys.readouterr().out)
    from fedchurn.shared.config import default_config

    assert load_config(shown) == default_config()
