"""Progress reporting: ETAs, stage and round lines, the heartbeat, σ announcements, epoch lines, the dry-run plan,
and the audit's accounting of repeated mechanisms."""

from __future__ import annotations

import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedchurn.progress import (
    PROGRESS_LOGGER,
    ConsoleProgress,
    EpochTimer,
    eta_seconds,
    format_duration,
    process_started,
    report_stage,
)
from fedchurn.server.report import RunRecorder
from fedchurn.server.strategy import Reply
from fedchurn.shared.config import apply_overrides, default_config
from fedchurn.shared.wire import to_array_record


def test_eta_leaves_out_the_first_step_and_follows_the_last_three() -> None:
    # First round 10 s (start-up), then 1, 1, 4, 4, 4: the recent pace is 4 s, 4 rounds are left.
    assert eta_seconds([10.0, 1.0, 1.0, 4.0, 4.0, 4.0], done=6, total=10) == pytest.approx(16.0)
    assert eta_seconds([3.0], done=1, total=4) == pytest.approx(9.0)  # one timed step: it is all we know
    assert eta_seconds([10.0, 2.0], done=2, total=5) == pytest.approx(6.0)
    assert eta_seconds([], done=0, total=5) is None
    assert eta_seconds([1.0, 1.0], done=2, total=2) == 0.0


def test_format_duration() -> None:
    assert format_duration(4.24) == "4.2 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(3720) == "1 h 02 min"


def test_process_started_is_before_now_and_before_this_module_was_imported() -> None:
    import fedchurn.progress as module

    started = process_started()
    assert started <= module._IMPORTED_AT <= time.time()


def test_epoch_timer_counts_and_estimates() -> None:
    timer = EpochTimer(3)
    assert timer.eta is None
    timer.lap()
    assert timer.done == 1 and timer.eta is not None and timer.eta >= 0.0
    timer.lap()
    timer.lap()
    assert timer.eta == 0.0


def _console(heartbeat_s: float = 60.0) -> tuple[ConsoleProgress, io.StringIO]:
    stream = io.StringIO()
    return ConsoleProgress(stream, started=time.time() - 5.0, heartbeat_s=heartbeat_s, live=False), stream


def _round_record(server_round: int, rounds: int, seconds: float) -> logging.LogRecord:
    record = logging.LogRecord(PROGRESS_LOGGER, logging.INFO, __file__, 1, "round %d/%d", (server_round, rounds), None)
    record.progress_round = (server_round, rounds, seconds)
    return record


def test_round_lines_get_an_eta_from_the_rounds_timed_so_far() -> None:
    console, stream = _console()
    for server_round, seconds in ((1, 9.0), (2, 2.0), (3, 4.0)):
        console.emit(_round_record(server_round, 5, seconds))
    lines = stream.getvalue().splitlines()
    # After round 3 of 5: rounds 2 and 3 (the first left out) average 3 s, 2 rounds left -> 6 s.
    assert lines[2].endswith("round 3/5  ETA 6.0 s")
    assert lines[0].endswith("round 1/5  ETA 36.0 s")  # only round 1 timed: 4 more like it
    assert all(line.startswith("[") and " s] " in line for line in lines)  # elapsed since the process started
    console.emit(_round_record(5, 5, 3.0))
    assert stream.getvalue().splitlines()[-1].endswith("round 5/5")  # nothing left: no ETA
    assert console.stage.startswith("finishing")


def test_stage_lines_and_the_heartbeat_name_the_stage() -> None:
    console, stream = _console(heartbeat_s=0.0)
    with console.install():
        report_stage("starting Ray with %d CPUs", 2)
        console.tick()  # what the heartbeat thread does when nothing was written for heartbeat_s
    lines = stream.getvalue().splitlines()
    assert "starting Ray with 2 CPUs" in lines[0]
    assert any("still starting Ray with 2 CPUs" in line for line in lines[1:])
    assert console not in logging.getLogger(PROGRESS_LOGGER).handlers  # removed again


def test_no_heartbeat_before_the_first_line() -> None:
    """A command failing on its input must say only its one-line error: nothing before the first stage."""
    console, stream = _console(heartbeat_s=0.0)
    console.tick()
    assert stream.getvalue() == ""


def test_no_heartbeat_while_lines_keep_coming() -> None:
    console, stream = _console(heartbeat_s=3600.0)
    console.emit(_round_record(1, 2, 1.0))
    console.tick()
    assert "still" not in stream.getvalue()


class _Records(logging.Handler):
    """Collects the progress logger's records (it does not propagate: the CLI owns its output)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> list[logging.LogRecord]:
        logger = logging.getLogger(PROGRESS_LOGGER)
        self._level = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        return self.records

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger(PROGRESS_LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._level)


def _reply(name: str, sigma: float) -> Reply:
    metrics = {"epsilon": 1.0, "delta": 1e-5, "noise-multiplier": sigma, "num-examples": 1.0}
    return Reply(institution=name, metrics=metrics, message=None, weight=1.0)  # type: ignore[arg-type]


def _finish_round(recorder: RunRecorder, server_round: int) -> None:
    recorder.round_finished(server_round, to_array_record({"w": np.zeros(2, np.float32)}))


def test_recorder_reports_rounds_with_their_number_and_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = RunRecorder(tmp_path, rounds=3)
    recorder.round_finished(0, to_array_record({"w": np.zeros(2, np.float32)}))
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        logging.getLogger(PROGRESS_LOGGER).propagate = True
        try:
            recorder.on_train(1, [_reply("bank-a", 1.1)], [])
            _finish_round(recorder, 1)
        finally:
            logging.getLogger(PROGRESS_LOGGER).propagate = False
    (record,) = [r for r in caplog.records if hasattr(r, "progress_round")]
    server_round, rounds, seconds = record.progress_round
    assert (server_round, rounds) == (1, 3) and seconds >= 0.0
    assert not any("σ" in r.getMessage() for r in caplog.records)  # a fixed-σ run: not announced


def test_target_epsilon_run_announces_each_banks_sigma_once(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, rounds=3, announce_sigma=True)
    recorder.round_finished(0, to_array_record({"w": np.zeros(2, np.float32)}))
    with _Records() as records:
        recorder.on_train(1, [_reply("bank-a", 0.91), _reply("bank-b", 1.734)], [])
        _finish_round(recorder, 1)
        recorder.on_train(2, [_reply("bank-a", 0.91), _reply("bank-b", 1.734)], [])
        _finish_round(recorder, 2)
        recorder.on_train(3, [_reply("bank-a", 0.95), _reply("bank-b", 1.734)], [])  # bank-a re-planned
        _finish_round(recorder, 3)
    sigma_lines = [r.getMessage() for r in records if "σ" in r.getMessage()]
    assert sigma_lines == [
        "σ each bank planned for its target ε: bank-a 0.910, bank-b 1.734",
        "σ each bank planned for its target ε: bank-a 0.950",
    ]


def test_epoch_lines_carry_loss_validation_elapsed_and_eta() -> None:
    from fedchurn.pretraining.trainer import EpochReporter

    reporter = EpochReporter(epochs=3, queue=object())  # log() never touches the queue
    with _Records() as records:
        # The worker times its epochs: the first (10 s, start-up) is left out of the ETA once there is another.
        reporter.log({"epoch": 1, "train_loss": 0.5, "val_loss": 0.45, "val_auc": 0.8, "seconds": 10.0})
        reporter.log({"epoch": 2, "train_loss": 0.4, "val_loss": 0.41, "val_auc": 0.82, "seconds": 2.0})
        reporter.log({"epoch": 3, "train_loss": 0.35, "val_loss": 0.40, "seconds": 2.0})
    lines = [r.getMessage() for r in records]
    assert lines[0].startswith("epoch 1/3  loss 0.5000  val loss 0.4500  val auc 0.8000  elapsed ")
    assert lines[0].endswith("ETA 20.0 s") and lines[1].endswith("ETA 2.0 s")
    assert lines[2].startswith("epoch 3/3  loss 0.3500  val loss 0.4000  elapsed ") and "ETA" not in lines[2]
    assert [getattr(r, "progress_stage", None) for r in records] == [
        "training epoch 2/3",
        "training epoch 3/3",
        "finishing: Ray Train's checkpoint and shutdown",
    ]


# --- dry run ---------------------------------------------------------------------------------------


def _small_config(tmp_path: Path, **overrides: Any) -> Any:
    base = apply_overrides(
        default_config(),
        {
            "data.synthetic.institutions": 2,
            "data.synthetic.min_rows": 400,
            "data.synthetic.max_rows": 900,
            "rounds": 3,
            "output_dir": str(tmp_path / "run"),
            **overrides,
        },
    )
    return base


def test_dry_run_plan_uses_the_rows_steps_and_accounting_of_a_round(tmp_path: Path) -> None:
    from fedchurn.clients.prepared_institution import prepare_institution
    from fedchurn.shared.institution_rows import institution_names
    from fedchurn.shared.privacy_accounting import compute_epsilon
    from fedchurn.simulation.dry_run import plan_banks

    config = _small_config(tmp_path, **{"evaluation.mode": "off"})
    names = tuple(institution_names(config.data, seed=config.seed, output_dir=config.output_dir))
    plans = plan_banks(config, names)
    assert [p.name for p in plans] == list(names)
    for plan in plans:
        data = prepare_institution(config, plan.name)
        n = len(data.y_train)
        assert (plan.n_train, plan.n_val, plan.n_test) == (n, len(data.y_val), len(data.y_test))
        batch = config.training.batch_size
        assert plan.sample_rate == pytest.approx(1 / math.ceil(n / batch))  # Opacus' q for a Poisson loader
        assert plan.steps_per_round == config.training.local_epochs * math.ceil(n / batch)
        assert plan.noise_multiplier == config.privacy.noise_multiplier
        expected = compute_epsilon(
            noise_multiplier=config.privacy.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=config.rounds * plan.steps_per_round,
            delta=config.privacy.delta,
        )
        assert plan.projected_epsilon == pytest.approx(expected, rel=1e-9)
    assert not (tmp_path / "run" / "institutions").exists()  # planning writes no state


def test_dry_run_plans_sigma_for_the_target_from_n(tmp_path: Path) -> None:
    from fedchurn.shared.institution_rows import institution_names
    from fedchurn.simulation.dry_run import plan_banks

    config = _small_config(tmp_path, **{"privacy.noise_multiplier": None, "privacy.target_epsilon": 3.0})
    names = tuple(institution_names(config.data, seed=config.seed, output_dir=config.output_dir))
    plans = plan_banks(config, names)
    sigmas = []
    for plan in plans:
        assert plan.projected_epsilon is not None and plan.noise_multiplier is not None
        assert 0.98 * 3.0 <= plan.projected_epsilon <= 3.0  # evaluation releases included, within the target
        sigmas.append((plan.n_train, plan.noise_multiplier))
    # A smaller bank is sampled at a higher rate: it needs more noise for the same ε.
    sigmas.sort()
    assert sigmas[0][1] > sigmas[-1][1]


def test_dry_run_with_dp_off_projects_no_epsilon(tmp_path: Path) -> None:
    from fedchurn.simulation.dry_run import plan_banks

    config = _small_config(tmp_path, **{"privacy.enabled": False})
    (plan,) = plan_banks(config, ("bank-01",))
    assert plan.noise_multiplier is None and plan.projected_epsilon is None and "DP off" in plan.note


def test_simulate_dry_run_prints_header_and_one_row_per_bank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedchurn.cli.main import main

    argv = ["simulate", "--dry-run", "--out", str(tmp_path / "out"), "--rounds", "2"]
    argv += ["--set", "data.synthetic.institutions=3", "--set", "data.synthetic.max_rows=800"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Transfer: finetune; encoder: random init (seed 0)" in captured.out
    rows = [line for line in captured.out.splitlines() if line.startswith("bank-")]
    assert len(rows) == 3 and all(line.split()[7] == "1.200" for line in rows)  # σ column
    assert "checking the config and the institutions" in captured.err  # stage lines on stderr


# --- audit accounting ------------------------------------------------------------------------------


def test_pld_of_repeated_rounds_equals_one_composition_of_all_their_steps() -> None:
    """Grouping identical rounds must not change ε: checked against dp-accounting composing each round apart."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    from fedchurn.auditing.independent_accounting import pld_epsilon, rdp_epsilon

    history = [(1.1, 0.05, 20), (1.1, 0.05, 20), (2.0, 1.0, 1), (1.1, 0.05, 20)]
    reference = pld_privacy_accountant.PLDAccountant()
    for sigma, q, steps in history:  # one event per round, as before grouping
        reference.compose(
            dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        )
    assert pld_epsilon(history, delta=1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)
    assert rdp_epsilon(history, delta=1e-5) == pytest.approx(
        rdp_epsilon([(1.1, 0.05, 60), (2.0, 1.0, 1)], delta=1e-5), rel=1e-12
    )
    # Not merged: a different σ or q is a different mechanism.
    assert pld_epsilon([(1.1, 0.05, 20), (1.2, 0.05, 20)], delta=1e-5) != pld_epsilon([(1.1, 0.05, 40)], delta=1e-5)


def test_rdp_epsilon_with_cached_curves_is_exactly_opacus() -> None:
    """Each (q, σ) curve is computed once: ε must still be Opacus' own float, for any history."""
    import random
    import warnings

    from opacus.accountants import RDPAccountant

    from fedchurn.shared.privacy_accounting import AccountantState, MechanismStep, epsilon_of

    rng = random.Random(7)
    for _ in range(40):
        history = [
            (rng.choice([0.6, 1.0, 1.3, 4.0]), rng.choice([0.004, 0.05, 0.3, 1.0]), rng.randint(1, 400))
            for _ in range(rng.randint(1, 4))
        ]
        delta = rng.choice([1e-6, 1e-5, 1e-3])
        reference = RDPAccountant()
        reference.history = list(history)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = float(reference.get_epsilon(delta=delta))
        state = AccountantState(
            accountant="rdp",
            history=tuple(MechanismStep(noise_multiplier=s, sample_rate=q, steps=n) for s, q, n in history),
        )
        assert epsilon_of(state, delta=delta) == expected
