"""Run folders: `fedchurn runs` lists them with their state, `--resume RUN_DIR` continues one, `fedchurn split`
exports each institution's split exactly as the bank splits it. No Ray here: folders are written by hand (the
real runs are in tests/test_api.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedchurn.api.folders import FAILED, FINISHED, STOPPED, find_runs, inspect_run, resume_config
from fedchurn.api.split import SOURCE_LINE, export_split
from fedchurn.cli.main import main
from fedchurn.shared.config import apply_overrides, default_config, dump_config
from fedchurn.shared.errors import ConfigError


def test_file_names_agree_with_the_server() -> None:
    from fedchurn.api import folders
    from fedchurn.server import app, checkpoint, report, resume

    assert folders.SUMMARY_FILE == report.SUMMARY_FILE
    assert folders.ROUNDS_FILE == report.ROUNDS_FILE == resume.ROUNDS_FILE
    assert folders.STATE_FILE == resume.STATE_FILE
    assert folders.CHECKPOINT_DIR == checkpoint.CHECKPOINT_DIR
    assert folders.CONFIG_FILE == app.CONFIG_FILE


def _config_file(folder: Path, *, rounds: int, run_name: str | None = "sim-20260105-093000-abcd", **extra) -> None:
    overrides = {"rounds": rounds, "output_dir": str(folder), "federation.run_name": run_name, **extra}
    config = apply_overrides(default_config(), overrides)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(dump_config(config), encoding="utf-8")


def _finished(folder: Path) -> None:
    _config_file(folder, rounds=3)
    summary = {
        "institutions": {
            "bank-01": {"auc": 0.70, "epsilon": 2.5, "n_train": 0, "n_test": 50, "evaluated_round": 3},
            "bank-02": {"auc": None, "epsilon": 4.0, "n_train": 0, "n_test": 40, "evaluated_round": 3},
            "bank-03": {"auc": 0.80, "epsilon": 3.0, "n_train": 0, "n_test": 45, "evaluated_round": 3},
        },
        "rounds": 3,
        "rounds_planned": 3,
        "run_id": "sim-20260105-093000-abcd",
    }
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (folder / "rounds.jsonl").write_text("", encoding="utf-8")


def _stopped(folder: Path, *, run_name: str | int = "night-run") -> None:
    _config_file(folder, rounds=5, run_name=run_name if isinstance(run_name, str) else None)
    state = {
        "format": 1,
        "run_name": run_name,
        "round": 2,
        "rounds_planned": 5,
        "fingerprint": "x",
        "records": {
            "latest": {"bank-01": {"auc": 0.6, "epsilon": 1.5, "round": 2}, "bank-02": {"auc": 0.9, "epsilon": 1.0}},
            "trained": {},
            "dropped": [],
            "completed_rounds": 2,
            "round_seconds": [1.0, 1.0],
        },
    }
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "server-state.json").write_text(json.dumps(state), encoding="utf-8")
    (folder / "rounds.jsonl").write_text("", encoding="utf-8")


def _failed(folder: Path) -> None:
    _config_file(folder, rounds=4)
    line = {"round": 1, "phase": "train", "institution": "bank-01", "reason": "declined", "dropped": True}
    (folder / "rounds.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")


def test_status_rounds_auc_and_epsilon_of_each_kind_of_run(tmp_path: Path) -> None:
    _finished(tmp_path / "a")
    _stopped(tmp_path / "b")
    _failed(tmp_path / "c")
    finished, stopped, failed = (inspect_run(tmp_path / name) for name in "abc")

    assert (finished.status, finished.completed_rounds, finished.planned_rounds) == (FINISHED, 3, 3)
    assert finished.mean_auc == pytest.approx(0.75)  # bank-02 released no AUC
    assert (finished.epsilon_min, finished.epsilon_max) == (2.5, 4.0)
    assert finished.started is not None and finished.started.isoformat() == "2026-01-05T09:30:00+00:00"
    assert finished.resume_command.endswith(f"--resume {tmp_path / 'a'} --rounds N  (N > 3)")

    assert (stopped.status, stopped.status_text) == (STOPPED, "stopped at round 2 of 5")
    assert stopped.mean_auc == pytest.approx(0.75)
    assert (stopped.epsilon_min, stopped.epsilon_max) == (1.0, 1.5)
    assert stopped.run_name == "night-run"
    assert stopped.resume_command == f"fedchurn simulate --resume {tmp_path / 'b'}"

    assert (failed.status, failed.completed_rounds, failed.mean_auc) == (FAILED, 0, None)
    assert failed.status_text == "failed before round 1"


def test_runs_are_found_below_a_folder_but_not_inside_a_run(tmp_path: Path) -> None:
    _finished(tmp_path / "exp" / "one")
    _stopped(tmp_path / "two")
    _failed(tmp_path / "two" / "institutions" / "bank-01")  # inside a run: never a run of its own
    (tmp_path / "empty").mkdir()
    assert find_runs(tmp_path) == [tmp_path / "exp" / "one", tmp_path / "two"]
    assert find_runs(tmp_path, depth=1) == [tmp_path / "two"]
    assert find_runs(tmp_path / "two") == [tmp_path / "two"]


def test_a_damaged_folder_is_listed_with_its_problem(tmp_path: Path) -> None:
    _finished(tmp_path / "bad")
    (tmp_path / "bad" / "summary.json").write_text("{not json", encoding="utf-8")
    info = inspect_run(tmp_path / "bad")
    assert info.status == FAILED and info.problem is not None and "JSONDecodeError" in info.problem
    with pytest.raises(ConfigError, match="cannot be resumed"):
        resume_config(tmp_path / "bad")


def test_runs_command_prints_every_run_and_how_to_continue_it(tmp_path: Path, capsys) -> None:
    _finished(tmp_path / "a")
    _stopped(tmp_path / "b")
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    row_a = next(line for line in lines if line.startswith("a "))
    row_b = next(line for line in lines if line.startswith("b "))
    assert "finished" in row_a and "3/3" in row_a and "0.750" in row_a and "2.50-4.00" in row_a
    assert "2026-01-05 09:30" in row_a
    assert "stopped at round 2 of 5" in row_b and "2/5" in row_b and "1.00-1.50" in row_b
    assert f"resume: fedchurn simulate --resume {tmp_path / 'b'}" in out
    assert main(["runs", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in listed] == [FINISHED, STOPPED]
    assert main(["runs", str(tmp_path / "nowhere")]) == 2


def test_resuming_a_stopped_run_uses_its_own_config_name_and_folder(tmp_path: Path) -> None:
    _stopped(tmp_path / "b")
    config = resume_config(tmp_path / "b")
    assert config.federation.resume is True
    assert config.federation.run_name == "night-run"
    assert config.output_dir == str((tmp_path / "b").resolve())
    assert config.rounds == 5
    assert resume_config(tmp_path / "b", {"rounds": 8}).rounds == 8
    with pytest.raises(ConfigError, match="already completed 2 rounds"):
        resume_config(tmp_path / "b", {"rounds": 1})
    with pytest.raises(ConfigError, match="stays in its folder"):
        resume_config(tmp_path / "b", {"output_dir": str(tmp_path / "elsewhere")})


def test_a_finished_run_resumes_only_with_more_rounds(tmp_path: Path) -> None:
    _finished(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"already finished its 3 rounds.*--rounds"):
        resume_config(tmp_path / "a")
    assert resume_config(tmp_path / "a", {"rounds": 6}).rounds == 6


def test_what_cannot_be_resumed_is_refused_with_the_reason(tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match="is not a run folder"):
        resume_config(tmp_path)
    _stopped(tmp_path / "flower-id", run_name=6689097408123614226)
    with pytest.raises(ConfigError, match="without federation.run_name"):
        resume_config(tmp_path / "flower-id")
    _finished(tmp_path / "real")
    config_path = tmp_path / "real" / "config.yaml"
    real = apply_overrides(default_config(), {"federation.members": {"17": "bank-01"}, "rounds": 3})
    config_path.write_text(dump_config(real), encoding="utf-8")
    with pytest.raises(ConfigError, match="real federation"):
        resume_config(tmp_path / "real")
    assert "fedchurn run" in inspect_run(tmp_path / "real").resume_command
    # On the command line: one line naming the problem, no traceback; a run's own config cannot be replaced.
    _stopped(tmp_path / "b")
    assert main(["simulate", "--resume", str(tmp_path / "b"), "other.yaml"]) == 2
    assert "cannot be given" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(tmp_path / "b"), "--rounds", "1", "--dry-run"]) == 2
    assert "already completed 2 rounds" in capsys.readouterr().err


# --- the split ---------------------------------------------------------------------------------------


def _small(out: Path, **extra):
    overrides = {
        "output_dir": str(out),
        "data.synthetic.institutions": 2,
        "data.synthetic.min_rows": 300,
        "data.synthetic.max_rows": 400,
        **extra,
    }
    return apply_overrides(default_config(), overrides)


def _client_split(config, index: int):
    """The split the simulated bank itself makes when it trains (clients/institution.py)."""
    from fedchurn.clients.institution import load_data, resolve_institution

    institution = resolve_institution({"partition-id": index, "num-partitions": 2}, config)
    return institution, load_data(institution)


def test_exported_split_is_the_one_each_simulated_bank_trains_on(tmp_path: Path) -> None:
    config = _small(tmp_path / "run")
    from fedchurn.shared.institution_rows import resolve_schema

    label, positive = resolve_schema(config.data).label, resolve_schema(config.data).positive
    result = export_split(config, out=tmp_path / "split")
    assert list(result.files["part"]) == ["train", "validation", "test"] * 2
    for index, name in enumerate(["bank-01", "bank-02"]):
        institution, prepared = _client_split(config, index)
        assert institution.name == name
        assert (institution.state_dir / "bank_secret.key").is_file()  # the export created the key the bank uses
        for part, labels in (("train", prepared.y_train), ("validation", prepared.y_val), ("test", prepared.y_test)):
            frame = pd.read_csv(tmp_path / "split" / name / f"{part}.csv")
            churned = frame[label].astype(str) == positive
            np.testing.assert_array_equal(np.asarray(churned, dtype=np.float32), labels)
            row = result.files[(result.files["institution"] == name) & (result.files["part"] == part)]
            assert int(row["rows"].iloc[0]) == len(frame) == len(labels)
        # The features too: the bank's preprocessing of the exported test rows is what it evaluates on.
        numeric = pd.read_csv(tmp_path / "split" / name / "test.csv")[list(resolve_schema(config.data).numeric)]
        first = prepared.preprocessor.feature_names.index(resolve_schema(config.data).numeric[0])
        bounds = resolve_schema(config.data).bounds[resolve_schema(config.data).numeric[0]]
        expected = (np.clip(numeric.iloc[:, 0], *bounds) - bounds[0]) / (bounds[1] - bounds[0]) * 4 - 2
        np.testing.assert_allclose(prepared.x_test[:, first], expected, rtol=1e-5, atol=1e-5)
    manifest = json.loads((tmp_path / "split" / "split.json").read_text(encoding="utf-8"))
    assert "secret key" in manifest["key"]["bank-01"]
    assert all(len(v) < 200 for v in manifest["key"].values())  # the key's location, never the key
    mode = (tmp_path / "split" / "bank-01" / "train.csv").stat().st_mode & 0o777
    assert mode == 0o600


def test_the_split_is_stable_per_key_and_secret_per_bank(tmp_path: Path) -> None:
    config = _small(tmp_path / "run")
    export_split(config, out=tmp_path / "one")
    with pytest.raises(ConfigError, match="already holds"):
        export_split(config, out=tmp_path / "one")
    export_split(config, out=tmp_path / "one", overwrite=True, format="parquet")
    export_split(config, out=tmp_path / "two")  # the keys now exist: the same split
    first = pd.read_csv(tmp_path / "one" / "bank-01" / "test.csv")
    again = pd.read_csv(tmp_path / "two" / "bank-01" / "test.csv")
    pd.testing.assert_frame_equal(first, again)
    parquet = pd.read_parquet(tmp_path / "one" / "bank-01" / "test.parquet")
    assert list(parquet[SOURCE_LINE]) == list(first[SOURCE_LINE])
    # Another run folder holds other banks' keys: another split of the same rows.
    other = export_split(_small(tmp_path / "other-run"), out=tmp_path / "three")
    moved = pd.read_csv(tmp_path / "three" / "bank-01" / "test.csv")
    assert set(moved[SOURCE_LINE]) != set(first[SOURCE_LINE])
    same_rows = other.files.groupby("institution")["rows"].sum().to_dict()
    assert same_rows == export_split(config, out=tmp_path / "four").files.groupby("institution")["rows"].sum().to_dict()


def test_a_bank_exports_its_own_split_with_its_state_folder_key(tmp_path: Path) -> None:
    from fedchurn.shared.bank_random import bank_secret_key

    config = _small(tmp_path / "run")
    with pytest.raises(ConfigError, match="one bank's state folder"):
        export_split(config, out=tmp_path / "x", state_dir=tmp_path / "bank")
    result = export_split(config, out=tmp_path / "mine", institutions=["bank-02"], state_dir=tmp_path / "bank")
    assert set(result.files["institution"]) == {"bank-02"}
    _, created = bank_secret_key(tmp_path / "bank")
    assert not created  # the export made it, where the bank's SuperNode keeps it
    assert not (tmp_path / "run" / "institutions").exists()  # no simulated bank's key was touched


def test_the_research_split_matches_the_reproducible_one(tmp_path: Path) -> None:
    from fedchurn.clients.prepared_institution import prepare_institution

    config = _small(tmp_path / "run", **{"privacy.reproducible_noise": True})
    result = export_split(config, out=tmp_path / "split")
    assert "NOT secret" in result.key_source["bank-01"]
    prepared = prepare_institution(config, "bank-01")
    test = pd.read_csv(tmp_path / "split" / "bank-01" / "test.csv")
    assert len(test) == len(prepared.y_test)
    assert not (tmp_path / "run" / "institutions").exists()


def test_split_command(tmp_path: Path, capsys) -> None:
    config_path = tmp_path / "c.yaml"
    config_path.write_text(dump_config(_small(tmp_path / "run")), encoding="utf-8")
    assert main(["split", str(config_path), "--out", str(tmp_path / "s"), "--institution", "bank-01"]) == 0
    out = capsys.readouterr().out
    assert "bank-01" in out and "bank-02" not in out and "secret key" in out
    assert sorted(p.name for p in (tmp_path / "s" / "bank-01").iterdir()) == ["test.csv", "train.csv", "validation.csv"]


def _write_lines(folder: Path, lines: list[dict]) -> None:
    (folder / "rounds.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def test_round_frame_from_hand_written_records(tmp_path: Path) -> None:
    from fedchurn.api import load_run

    _stopped(tmp_path / "b")
    lines = [
        {"round": 1, "phase": "train", "institution": "A", "epsilon": 1.0, "noise-multiplier": 1.1, "num-examples": 1},
        {"round": 1, "phase": "train", "institution": "B", "epsilon": 0.5, "noise-multiplier": 1.3, "num-examples": 1},
        {
            "round": 1,
            "phase": "evaluate",
            "institution": "A",
            "auc": 0.7,
            "ece": 0.1,
            "kept-round": 1.0,
            "epsilon": 1.2,
        },
        {"round": 2, "phase": "train", "institution": "A", "epsilon": 1.6, "noise-multiplier": 1.1, "num-examples": 1},
        {"round": 2, "phase": "train", "institution": "B", "reason": "declined: budget", "dropped": True},
    ]
    _write_lines(tmp_path / "b", lines)
    run = load_run(tmp_path / "b")
    assert run.status == "stopped at round 2 of 5" and not run.finished
    rows = run.rounds.set_index(["round", "institution"])
    assert list(rows.index) == [(1, "A"), (1, "B"), (2, "A")]  # B's declined round 2 is no row
    assert rows.loc[(1, "A"), "epsilon"] == 1.2 and rows.loc[(1, "A"), "epsilon_after_training"] == 1.0
    assert rows.loc[(1, "A"), "auc"] == 0.7 and rows.loc[(1, "A"), "model_round"] == 1.0
    assert rows.loc[(1, "B"), "epsilon"] == 0.5 and rows.loc[(1, "B"), "noise_multiplier"] == 1.3
    assert bool(rows.loc[(1, "B"), "evaluated"]) is False and np.isnan(rows.loc[(1, "B"), "auc"])
    assert list(run.dropped["reason"]) == ["declined: budget"] and len(run.records) == 5
    # A stopped run's latest metrics come from its checkpoint.
    banks = run.institutions.set_index("institution")
    assert banks.loc["bank-01", "auc"] == 0.6 and banks.loc["bank-01", "evaluated_round"] == 2

    # Evaluation off: no evaluation record at all; ε from training.
    _failed(tmp_path / "c")
    _write_lines(tmp_path / "c", lines[:2])
    off = load_run(tmp_path / "c")
    assert not off.rounds["evaluated"].any() and off.rounds["auc"].isna().all()
    assert list(off.rounds["epsilon"]) == [1.0, 0.5] and off.info.epsilon_max == 1.0
    assert off.institutions.empty and off.dropped.empty


@pytest.mark.slow  # two real simulations on Ray
def test_an_interrupted_simulation_is_listed_as_stopped_and_resumed_by_its_folder(tmp_path: Path, capsys) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    small = ["--set", "data.synthetic.institutions=2", "--set", "data.synthetic.min_rows=300"]
    small += ["--set", "data.synthetic.max_rows=400", "--set", "simulation.ray_num_cpus=2"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "fedchurn.cli.main", "simulate", "--out", str(out), "--rounds", "4", *small]
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    state = out / "checkpoints" / "server-state.json"
    try:
        deadline = time.monotonic() + 300
        while not (state.is_file() and json.loads(state.read_text())["round"] >= 1):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)  # Ctrl-C: stop after the round under way
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output[-3000:]

    info = inspect_run(out)
    assert info.status == STOPPED and 1 <= info.completed_rounds < 4 and info.planned_rounds == 4
    assert main(["runs", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert f"stopped at round {info.completed_rounds} of 4" in listing
    assert f"resume: fedchurn simulate --resume {out}" in listing

    resumed = subprocess.run(
        [sys.executable, "-m", "fedchurn.cli.main", "simulate", "--resume", str(out)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    done = inspect_run(out)
    assert (done.status, done.completed_rounds, done.run_name) == (FINISHED, 4, info.run_name)
    rounds = {json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()}
    assert rounds == {1, 2, 3, 4}


def test_a_metric_no_bank_released_is_a_numeric_column_of_nan() -> None:
    """Two tiny banks whose noisy releases left AUC undefined: the column is float NaN, ready for arithmetic."""
    from fedchurn.api.results import institutions_frame

    frame = institutions_frame(
        {
            "bank-b": {"auc": None, "ece": 0.1, "n_test": 40, "status": None},
            "bank-a": {"auc": None, "ece": None, "n_test": 35, "status": "stopped"},
        }
    )
    assert list(frame["institution"]) == ["bank-a", "bank-b"]
    assert frame["auc"].dtype == np.float64 and frame["auc"].isna().all()
    assert frame["ece"].dtype == np.float64 and np.isnan(frame["ece"][0]) and frame["ece"][1] == 0.1
    assert list(frame["n_test"]) == [35, 40]
    assert frame["status"][0] == "stopped" and pd.isna(frame["status"][1])  # text stays text
