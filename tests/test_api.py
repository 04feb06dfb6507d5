"""The Python API: `import fedchurn` stays cheap; configs and `__` overrides; a real simulation through
`fedchurn.simulate` whose frames agree with the files the run wrote; resume by folder; predict and audit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedchurn
from fedchurn.api.calls import resolve_config, simulation_config
from fedchurn.shared.config import FedChurnConfig, default_config, dump_config
from fedchurn.shared.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]

TINY = {
    "rounds": 2,
    "seed": 7,
    "data__synthetic__institutions": 2,
    "data__synthetic__min_rows": 300,
    "data__synthetic__max_rows": 400,
    "simulation__ray_num_cpus": 2,
}


def test_importing_fedchurn_loads_no_heavy_library() -> None:
    code = (
        "import sys, fedchurn; "
        "heavy = [m for m in ('torch', 'pandas', 'flwr', 'ray', 'opacus') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "assert callable(fedchurn.simulate) and 'load_run' in dir(fedchurn); "
        "print('pandas' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"  # the API itself was imported on first use
    with pytest.raises(AttributeError, match="no attribute 'simulat'"):
        fedchurn.simulat  # noqa: B018


def test_overrides_are_dotted_keys_spelled_with_double_underscores(tmp_path: Path, monkeypatch) -> None:
    config = resolve_config(None, {"privacy__target_epsilon": 3.0, "privacy__noise_multiplier": None, "rounds": 4})
    assert (config.privacy.target_epsilon, config.privacy.noise_multiplier, config.rounds) == (3.0, None, 4)
    with pytest.raises(ConfigError, match="privacy.no_such_key"):
        resolve_config(None, {"privacy__no_such_key": 1})
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(resolve_config(None, {"seed": 11})), encoding="utf-8")
    assert resolve_config(path).seed == resolve_config(str(path)).seed == 11
    assert resolve_config({"seed": 12, "rounds": 1}).rounds == 1
    assert isinstance(resolve_config(default_config()), FedChurnConfig)
    monkeypatch.chdir(tmp_path)  # relative paths: from the current folder, as on the command line
    relative = resolve_config(None, {"model__encoder_checkpoint": "enc/encoder.pt"})
    assert relative.model.encoder_checkpoint == str(tmp_path / "enc" / "encoder.pt")
    with pytest.raises(ConfigError, match="must be None, a YAML path"):
        resolve_config(42)  # type: ignore[arg-type]


def test_a_new_simulation_is_named_and_never_overwrites_an_earlier_run(tmp_path: Path) -> None:
    config = simulation_config(overrides={"output_dir": str(tmp_path)})
    assert config.federation.run_name is not None and config.federation.run_name.startswith("sim-")
    (tmp_path / "summary.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError, match="overwrite=True"):
        simulation_config(overrides={"output_dir": str(tmp_path)})
    assert simulation_config(overwrite=True, overrides={"output_dir": str(tmp_path)}).output_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="its own config.yaml"):
        simulation_config("other.yaml", resume=tmp_path)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> fedchurn.RunResult:
    out = tmp_path_factory.mktemp("api-run")
    return fedchurn.simulate(output_dir=str(out), **TINY)


def _lines(folder: Path) -> list[dict]:
    text = (folder / "rounds.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_simulate_returns_frames_that_agree_with_the_run_folder(run: fedchurn.RunResult) -> None:
    folder = run.run_dir
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    lines = _lines(folder)
    assert run.finished and run.status == "finished" and run.info.completed_rounds == 2
    assert run.config is not None and run.config.rounds == 2

    # One row per bank: the summary's final metrics.
    banks = run.institutions.set_index("institution")
    assert sorted(banks.index) == sorted(summary["institutions"]) == ["bank-01", "bank-02"]
    for name, entry in summary["institutions"].items():
        for key in ("auc", "pr_auc", "brier", "ece", "epsilon", "n_test", "model_round"):
            expected = np.nan if entry[key] is None else entry[key]
            np.testing.assert_allclose(float(banks.loc[name, key]), expected, equal_nan=True)

    # Every rounds.jsonl line, with the summary's metric names.
    assert len(run.records) == len(lines)
    assert {"round", "phase", "institution", "noise_multiplier", "epsilon"} <= set(run.records.columns)

    # One row per round and bank: σ and ε of training, the evaluation's metrics, ε at the end of the round.
    trained = {(r["round"], r["institution"]): r for r in lines if r["phase"] == "train" and "reason" not in r}
    evaluated = {(r["round"], r["institution"]): r for r in lines if r["phase"] == "evaluate" and "reason" not in r}
    keys = sorted(set(trained) | set(evaluated))
    assert list(zip(run.rounds["round"], run.rounds["institution"], strict=True)) == keys
    assert list(run.rounds["round"].unique()) == [1, 2]
    for row in run.rounds.itertuples():
        train = trained.get((row.round, row.institution))
        evaluation = evaluated.get((row.round, row.institution))
        assert row.trained == (train is not None) and row.evaluated == (evaluation is not None)
        if train is not None:
            assert row.noise_multiplier == pytest.approx(train["noise-multiplier"])
            assert row.epsilon_after_training == pytest.approx(train["epsilon"])
        last = evaluation if evaluation is not None else train
        assert row.epsilon == pytest.approx(last["epsilon"])
        if evaluation is not None:
            for wire, column in (("auc", "auc"), ("pr-auc", "pr_auc"), ("ece", "ece"), ("kept-round", "model_round")):
                expected = np.nan if evaluation[wire] is None else evaluation[wire]
                np.testing.assert_allclose(getattr(row, column), expected, equal_nan=True)
    # ε only grows, round after round, at every bank (lifetime accounting).
    for _, history in run.rounds.groupby("institution"):
        assert history["epsilon"].is_monotonic_increasing

    # Loading the folder gives the same object.
    loaded = fedchurn.load_run(folder)
    pd.testing.assert_frame_equal(loaded.rounds, run.rounds)
    pd.testing.assert_frame_equal(loaded.institutions, run.institutions)
    assert loaded.info == run.info


def test_predict_and_audit_through_the_api(run: fedchurn.RunResult, tmp_path: Path) -> None:
    from fedchurn.shared.institution_rows import write_csv
    from fedchurn.shared.synthetic_consortium import generate_synthetic_institution

    assert run.config is not None
    customers = tmp_path / "customers.csv"
    table = generate_synthetic_institution(run.config.data.synthetic, 0, seed=99)
    write_csv(table, customers)
    scored = fedchurn.predict(run.run_dir, "bank-01", customers)
    assert scored.output == tmp_path / "customers.scores.csv"
    assert len(scored.scores) == table.n_rows
    assert list(scored.scores.columns) == ["churn_probability", "risk_decile"]
    assert scored.scores["churn_probability"].between(0, 1).all()
    assert scored.metrics is not None and scored.metrics["rows"] == table.n_rows
    assert int(scored.calibration["count"].sum()) == table.n_rows

    audit = fedchurn.audit(run.run_dir)
    assert audit.passed, audit.report
    assert sorted(audit.institutions["institution"]) == ["bank-01", "bank-02"]
    assert set(audit.rounds["round"]) >= {1, 2}
    final = audit.institutions.set_index("institution")["epsilon"]
    assert final.loc["bank-02"] == pytest.approx(run.institutions.set_index("institution").loc["bank-02", "epsilon"])


@pytest.mark.slow
def test_a_finished_run_resumed_by_its_folder_continues_its_rounds_and_epsilon(tmp_path: Path) -> None:
    first = fedchurn.simulate(output_dir=str(tmp_path), **{**TINY, "rounds": 1})
    assert first.info.completed_rounds == 1
    with pytest.raises(ConfigError, match="already finished its 1 rounds"):
        fedchurn.simulate(resume=tmp_path)
    more = fedchurn.simulate(resume=tmp_path, rounds=2)
    assert more.finished and more.info.completed_rounds == 2 and more.info.run_name == first.info.run_name
    assert list(more.rounds["round"].unique()) == [1, 2]
    pd.testing.assert_frame_equal(more.rounds[more.rounds["round"] == 1], first.rounds)  # round 1 kept as it was
    for name, history in more.rounds.groupby("institution"):
        assert history["epsilon"].iloc[-1] > first.rounds.set_index("institution").loc[name, "epsilon"]


def test_compare_through_the_api_gives_one_row_per_bank_and_mode(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    small = {k: v for k, v in TINY.items() if k != "simulation__ray_num_cpus"}
    result = fedchurn.compare(out=out, modes=["local", "logreg"], seeds=2, target_epsilon=3.0, **small)
    written = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert written["seeds"] == [7, 8]  # from the seed upwards, as `fedchurn compare --seeds 2`
    assert len(result.table) == 4 and len(result.per_seed) == 8
    for row in result.table.itertuples():
        entry = written["institutions"][row.institution][row.mode]
        assert row.auc == pytest.approx(entry["auc"]) and row.runs == entry["runs"] == 2
        assert row.private == (row.mode == "local")
        seeds = result.per_seed[
            (result.per_seed["institution"] == row.institution) & (result.per_seed["mode"] == row.mode)
        ]
        assert list(seeds["auc"]) == pytest.approx(entry["auc_per_seed"])
    with pytest.raises(ConfigError, match="already holds a comparison"):
        fedchurn.compare(out=out, modes=["logreg"], **small)


@pytest.mark.slow  # a local Ray and a Ray Train run
def test_pretrain_through_the_api(tmp_path: Path) -> None:
    result = fedchurn.pretrain(
        out=tmp_path / "enc", pretrain__source_rows=600, pretrain__epochs=1, simulation__ray_num_cpus=2
    )
    meta = json.loads((tmp_path / "enc" / "pretrain.json").read_text(encoding="utf-8"))
    assert result.checkpoint == tmp_path / "enc" / "encoder.pt" and result.checkpoint.is_file()
    assert dict(result.metrics) == pytest.approx({k: float(v) for k, v in meta["metrics"].items()})
