"""Experiment tracking (server/tracking.py): what the run recorder writes to rounds.jsonl reaches TensorBoard and
MLflow, read back with an independent reader; hostile names and values, a missing library, a broken or hanging
tracker never fail or stall the run; `none` imports neither library."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedchurn.server.report import ROUNDS_FILE, RunRecorder
from fedchurn.server.strategy import DroppedReply, Reply
from fedchurn.server.tracking import Tracker, round_scalars, safe_name, start_tracking
from fedchurn.shared.config import (
    ConfigError,
    FederationConfig,
    TrackingConfig,
    apply_overrides,
    config_from_run_config,
    config_to_run_config,
    default_config,
)
from fedchurn.shared.config import FedChurnConfig as Config
from fedchurn.shared.wire import to_array_record

ARRAYS = to_array_record({"encoder.0.weight": np.zeros((2, 3), dtype=np.float32)})
HOSTILE = "../../etc/évil name\n<script>" + "x" * 300


def _config(tmp_path: Path, backend: str, **federation: Any) -> Config:
    config = dataclasses.replace(
        default_config(),
        rounds=3,
        output_dir=str(tmp_path / "run"),
        tracking=TrackingConfig(backend=backend),  # type: ignore[arg-type]
    )
    if federation:
        config = dataclasses.replace(config, federation=FederationConfig(**federation))
    return config


def _reply(institution: str, metrics: Mapping[str, float]) -> Reply:
    return Reply(institution=institution, metrics=dict(metrics), message=None, weight=1.0)  # type: ignore[arg-type]


def _train(eps: float, sigma: float = 1.2) -> dict[str, float]:
    return {"num-examples": 1.0, "epsilon": eps, "delta": 1e-5, "noise-multiplier": sigma}


def _evaluate(auc: float, eps: float, **extra: float) -> dict[str, float]:
    metrics = {"num-examples": 301.0, "auc": auc, "pr-auc": auc / 2, "brier": 0.15, "ece": 0.04, "loss": 0.5}
    metrics.update({"mean-probability": 0.2, "churn-rate": 0.19, "val-auc": auc - 0.01, "kept-round": 2.0})
    metrics.update({"kept-auc": auc, "kept-ece": 0.04, "epsilon": eps, "delta": 1e-5, "n-train": 0.0})
    metrics.update({"n-test": 301.0, **extra})
    return metrics


def _drive(recorder: RunRecorder, *, first_round: int = 1, rounds: int = 3) -> None:
    """Rounds as the strategy reports them: training replies, a dropped one, evaluations in the last round."""
    recorder.round_finished(0, ARRAYS)
    for r in range(first_round, first_round + rounds):
        recorder.on_train(
            r,
            [_reply("bank-01", _train(0.5 * r)), _reply(HOSTILE, _train(0.4 * r, sigma=1e308))],
            [DroppedReply("node 7", "update norm overflows")] if r == 2 else [],
        )
        evaluations = [_reply("bank-01", _evaluate(0.70 + 0.01 * r, 0.6 * r))]
        evaluations.append(_reply(HOSTILE, _evaluate(math.nan, math.inf, loss=-math.inf)))
        if r == first_round + rounds - 1:
            evaluations.append(_reply("bank-02", _evaluate(0.80, 0.9)))
        recorder.on_evaluate(r, evaluations, [])
        recorder.round_finished(r, ARRAYS)
    recorder.write_summary(recorder.summary(extra={"run_id": "trial"}))


def _expected_from_rounds_file(out: Path) -> dict[tuple[str, int], float]:
    """tag, round -> value, built from rounds.jsonl (null values are not tracked)."""
    expected = {}
    for line in (out / ROUNDS_FILE).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("dropped"):
            continue
        for key, value in record.items():
            if key in ("round", "phase", "institution") or value is None:
                continue
            tag = f"{record['phase']}/{safe_name(key)}/{safe_name(record['institution'])}"
            expected[(tag, record["round"])] = value
    return expected


# --------------------------------------------------------------------------------------------------
# TensorBoard: the event file, read with a reader written here (TFRecord framing + the Event proto)
# --------------------------------------------------------------------------------------------------


def _read_events(logdir: Path) -> tuple[dict[tuple[str, int], float], dict[str, str]]:
    from tensorboardX.proto.event_pb2 import Event

    scalars, texts = {}, {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[(value.tag, event.step)] = value.simple_value
                elif value.tensor.string_val:
                    texts[value.tag] = value.tensor.string_val[0].decode("utf-8")
    return scalars, texts


def test_tensorboard_events_match_rounds_jsonl(tmp_path: Path) -> None:
    config = _config(tmp_path, "tensorboard")
    out = Path(config.output_dir)
    tracker = start_tracking(config, out, run_name="trial")
    assert tracker is not None
    recorder = RunRecorder(out, rounds=3, tracker=tracker)
    _drive(recorder)
    assert not tracker.failed

    logdir = out / "tensorboard" / "trial"
    scalars, texts = _read_events(logdir)
    assert [p for p in out.rglob("events.out.tfevents.*") if logdir not in p.parents] == []  # nowhere else
    per_bank = {key: value for key, value in scalars.items() if not key[0].startswith("round/")}
    expected = _expected_from_rounds_file(out)
    assert set(per_bank) == set(expected)
    with np.errstate(over="ignore"):  # event files hold float32: 1e308 is inf there
        for key, value in expected.items():
            assert per_bank[key] == pytest.approx(float(np.float32(value)), rel=1e-6), key
    assert ("train/noise-multiplier/bank-01", 3) in per_bank
    # The hostile name is one safe tag component; its non-finite values are left out, a huge one is kept.
    hostile = safe_name(HOSTILE)
    assert "/" not in hostile and "." not in hostile and len(hostile) <= 64
    assert (f"evaluate/auc/{hostile}", 1) not in scalars and (f"evaluate/epsilon/{hostile}", 1) not in scalars
    assert (f"train/noise-multiplier/{hostile}", 1) in scalars
    # The federation's statistics, by hand: round 3 evaluated bank-01 (0.73), bank-02 (0.80); the hostile AUC is NaN.
    assert scalars[("round/auc-mean", 3)] == pytest.approx((0.73 + 0.80) / 2)
    assert scalars[("round/auc-min", 3)] == pytest.approx(0.73)
    assert scalars[("round/epsilon-max", 3)] == pytest.approx(1.8)  # bank-01's evaluation ε, 0.6 x 3
    assert scalars[("round/replies-dropped", 2)] == 1.0 and scalars[("round/replies-dropped", 1)] == 0.0
    assert scalars[("round/institutions-evaluated", 3)] == 3.0
    assert {step for tag, step in scalars if tag == "round/seconds"} == {1, 2, 3}
    assert "rounds: 3" in texts["config/text_summary"]
    assert '"run_id": "trial"' in texts["summary/text_summary"]
    assert texts["status/text_summary"] == "FINISHED"


def test_round_scalars_skip_what_is_not_a_finite_number() -> None:
    values = round_scalars(
        train={"a": {"epsilon": math.inf, "delta": 1e-5}},
        evaluate={"a": {"auc": math.nan, "ece": -math.inf, "pr-auc": True, "loss": 10**400}},  # type: ignore[dict-item]
        seconds=math.nan,
        dropped=0,
    )
    assert values == {
        "train/delta/a": 1e-5,
        "round/replies-dropped": 0.0,
        "round/institutions-trained": 1.0,
        "round/institutions-evaluated": 1.0,
    }


def test_round_scalars_leave_out_per_bin_reliability_figures() -> None:
    per_bin = {"cal-prob-0": 0.1, "cal-rate-0": 0.2, "cal-rows-0": 30.0, "cal-prob-1": 0.6}
    values = round_scalars(train={}, evaluate={"a": {"auc": 0.7, **per_bin}}, seconds=1.0, dropped=0)
    assert not any("cal-" in tag for tag in values) and values["evaluate/auc/a"] == 0.7


def test_safe_names_are_distinct_and_accepted_by_both_backends() -> None:
    names = ["bank-01", "bank 01", "bank_01", "bank/01", "..", "", "ü", "a" * 64, "a" * 65, "a" * 66]
    safe = [safe_name(n) for n in names]
    assert len(set(safe)) == len(names)
    assert safe[0] == "bank-01" and safe[2] == "bank_01" and safe[7] == "a" * 64
    for name in safe:
        assert name and len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)


# --------------------------------------------------------------------------------------------------
# MLflow: the local store, read back with the MLflow client
# --------------------------------------------------------------------------------------------------


def _mlflow_client(out: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")


def test_mlflow_store_matches_rounds_jsonl_and_a_resumed_run_continues_it(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'fedchurn[tracking]'")
    config = _config(tmp_path, "mlflow", run_name="trial", resume=False)
    out = Path(config.output_dir)
    tracker = start_tracking(config, out, run_name="trial")
    assert tracker is not None
    recorder = RunRecorder(out, rounds=4, tracker=tracker)
    _drive(recorder)
    assert not tracker.failed
    expected = _expected_from_rounds_file(out)

    client = _mlflow_client(out)
    experiment = client.get_experiment_by_name("fedchurn")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "trial" and run.info.status == "FINISHED"
    assert run.data.params["rounds"] == "3" and run.data.params["tracking.backend"] == "mlflow"
    got = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key):
            got[(key, metric.step)] = metric.value
    assert {k: v for k, v in got.items() if not k[0].startswith("round/")} == pytest.approx(expected)
    assert got[("round/auc-mean", 3)] == pytest.approx((0.73 + 0.80) / 2)
    assert (f"train/noise-multiplier/{safe_name(HOSTILE)}", 1) in got  # 1e308 is a number
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "summary.json"}

    # federation.resume: the interrupted run's MLflow run gets the remaining rounds (the folder's tracking.json).
    resumed = dataclasses.replace(config, federation=FederationConfig(run_name="trial", resume=True))
    tracker = start_tracking(resumed, out, run_name="trial")
    assert tracker is not None
    recorder = RunRecorder(out / "again", rounds=4, tracker=tracker)
    recorder.round_finished(0, ARRAYS)
    recorder.on_train(4, [_reply("bank-01", _train(2.0))], [])
    recorder.round_finished(4, ARRAYS)
    assert tracker.finish(summary={"rounds": 4})
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/epsilon/bank-01")]
    assert sorted(steps) == [1, 2, 3, 4]
    assert client.get_run(run.info.run_id).data.params["federation.resume"] == "false"  # parameters stay


# --------------------------------------------------------------------------------------------------
# Failures: never fail or stall the run
# --------------------------------------------------------------------------------------------------


class _Recording:
    def __init__(self, fail_on: str = "", gate: threading.Event | None = None) -> None:
        self.calls: list[str] = []
        self.fail_on, self.gate = fail_on, gate

    def _call(self, name: str) -> None:
        if self.gate is not None:
            self.gate.wait()
        self.calls.append(name)
        if name == self.fail_on:
            raise OSError("disk full")

    def start(self, *, params: Mapping[str, str], config_yaml: str) -> None:
        self._call("start")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._call(f"scalars {step}")

    def finish(self, *, summary_json: str | None, status: str) -> None:
        self._call(f"finish {status}")


def _round(tracker: Tracker, step: int) -> None:
    tracker.log_round(step, train={"a": {"epsilon": 1.0}}, evaluate={}, seconds=1.0, dropped=0)


def test_a_failing_backend_warns_once_and_stops_tracking(caplog: pytest.LogCaptureFixture) -> None:
    backend = _Recording(fail_on="scalars 1")
    tracker = Tracker(lambda: backend, label="Test")
    with caplog.at_level(logging.WARNING, logger="fedchurn.server.tracking"):
        tracker.start(params={}, config_yaml="")
        for step in (1, 2, 3):
            _round(tracker, step)
        assert tracker.finish(summary={"x": math.nan}) is False  # a NaN summary is not JSON: sent without it
    assert backend.calls == ["start", "scalars 1"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "disk full" in warnings[0] and "the run goes on" in warnings[0]


def test_a_backend_that_cannot_open_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Any:
        raise ImportError("No module named 'mlflow'")

    tracker = Tracker(broken, label="MLflow")
    with caplog.at_level(logging.WARNING, logger="fedchurn.server.tracking"):
        _round(tracker, 1)
        _round(tracker, 2)
        assert tracker.finish() is False
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "pip install 'fedchurn[tracking]'" in warning


def test_a_hanging_backend_neither_blocks_rounds_nor_the_end_of_the_run(caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()
    backend = _Recording(gate=gate)
    tracker = Tracker(lambda: backend, label="Test", queue_size=2, close_timeout_s=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="fedchurn.server.tracking"):
            for step in range(1, 20):  # the thread is stuck on the first: the queue fills, values are dropped
                _round(tracker, step)
            assert tracker.finish() is False
        messages = [r.getMessage() for r in caplog.records]
        assert sum("cannot keep up" in m for m in messages) == 1
        assert sum("still pending" in m for m in messages) == 1
    finally:
        gate.set()


def test_a_run_that_ends_without_a_summary_is_marked_failed_at_exit() -> None:
    backend = _Recording()
    tracker = Tracker(lambda: backend, label="Test")
    _round(tracker, 1)
    tracker._at_exit()  # what the interpreter runs at exit when the run raised before its summary
    assert backend.calls == ["scalars 1", "finish FAILED"]
    tracker._at_exit()
    assert tracker.finish() is True and backend.calls == ["scalars 1", "finish FAILED"]  # once


def test_a_missing_library_does_not_fail_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    config = _config(tmp_path, "tensorboard")
    out = Path(config.output_dir)
    tracker = start_tracking(config, out, run_name=7)
    recorder = RunRecorder(out, rounds=3, tracker=tracker)
    _drive(recorder)
    assert tracker is not None and tracker.failed
    assert (out / "summary.json").is_file()


def test_a_tracker_that_cannot_start_leaves_the_run_untracked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import fedchurn.server.tracking as tracking

    def refuse(config: Any) -> Any:
        raise RuntimeError("cannot flatten")

    monkeypatch.setattr(tracking, "config_to_run_config", refuse)
    with caplog.at_level(logging.WARNING, logger="fedchurn.server.tracking"):
        assert start_tracking(_config(tmp_path, "mlflow"), tmp_path, run_name=1) is None
    assert "cannot flatten" in caplog.text and "the run goes on" in caplog.text
    assert list(tmp_path.iterdir()) == []  # no tracker left behind to write later


def test_none_imports_neither_library_and_writes_nothing(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from fedchurn.server.app import run_federation\n"
        "from fedchurn.server.tracking import start_tracking\n"
        "from fedchurn.shared.config import default_config\n"
        f"assert start_tracking(default_config(), Path({str(tmp_path)!r}), run_name=1) is None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboardX', 'tensorboard', 'mlflow')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# The config section
# --------------------------------------------------------------------------------------------------


def test_tracking_section_validates_and_travels_in_the_flower_run_config() -> None:
    config = apply_overrides(default_config(), {"tracking.backend": "mlflow", "tracking.experiment": "churn-q3"})
    assert config.tracking == TrackingConfig(backend="mlflow", experiment="churn-q3")
    assert config_from_run_config(config_to_run_config(config)).tracking == config.tracking
    for key, value in [
        ("tracking.backend", "wandb"),
        ("tracking.experiment", " "),
        ("tracking.directory", ""),
        ("tracking.mlflow_uri", ""),
    ]:
        with pytest.raises(ConfigError) as caught:
            apply_overrides(default_config(), {key: value})
        assert key in str(caught.value)


def test_a_relative_directory_is_inside_the_run_folder(tmp_path: Path) -> None:
    config = dataclasses.replace(
        _config(tmp_path, "tensorboard"), tracking=TrackingConfig(backend="tensorboard", directory="tb")
    )
    out = Path(config.output_dir)
    tracker = start_tracking(config, out, run_name="r")
    assert tracker is not None and tracker.finish()
    assert list((out / "tb" / "r").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------------------------------
# The wiring: a real simulation on Ray tracks through the ServerApp
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_a_simulation_tracks_every_round_it_records(tmp_path: Path) -> None:
    from fedchurn.shared.config import SyntheticConfig
    from fedchurn.simulation.driver import plan_simulation, run_simulation

    base = _config(tmp_path, "tensorboard", run_name="sim-tracked")
    config = dataclasses.replace(
        base,
        rounds=2,
        data=dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=300, max_rows=600)),
        simulation=dataclasses.replace(base.simulation, ray_num_cpus=1),
        evaluation=dataclasses.replace(base.evaluation, every_rounds=1),
    )
    summary = run_simulation(plan_simulation(config))
    out = Path(config.output_dir)
    scalars, texts = _read_events(out / "tensorboard" / "sim-tracked")
    expected = _expected_from_rounds_file(out)
    assert expected and {k for k in scalars if not k[0].startswith("round/")} == set(expected)
    assert {step for tag, step in scalars if tag == "round/seconds"} == {1, 2}
    assert scalars[("round/seconds", 2)] == pytest.approx(summary["seconds_per_round"][1], abs=1e-3)
    assert "summary/text_summary" in texts
