"""Resume: an interrupted run continued from its checkpoint ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fedchurn.server.resume import STATE_FILE, config_fingerprint, load_resume_point
from fedchurn.shared.config import SyntheticConfig, apply_overrides, default_config
from fedchurn.shared.errors import ConfigError
from fedchurn.shared.privacy_accounting import AccountantState, epsilon_of
from fedchurn.simulation.driver import plan_simulation, run_simulation

pytestmark = pytest.mark.filterwarnings("ignore")


def _config(out: Path, *, rounds: int, resume: bool = False):
    base = default_config()
    config = dataclasses.replace(
        base,
        rounds=rounds,
        seed=3,
        output_dir=str(out),
        data=dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=300, max_rows=500)),
        simulation=dataclasses.replace(base.simulation, ray_num_cpus=2),
    )
    # Bit-identical comparison needs the research switch: by default each bank's noise is secret and fresh.
    return apply_overrides(
        config,
        {
            "strategy.name": "fedadam",
            "federation.run_name": "r1",
            "federation.resume": resume,
            "privacy.reproducible_noise": True,
        },
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    straight = tmp_path_factory.mktemp("straight")
    run_simulation(plan_simulation(_config(straight, rounds=2)))
    interrupted = tmp_path_factory.mktemp("interrupted")
    run_simulation(plan_simulation(_config(interrupted, rounds=1)))  # "dies" after round 1
    run_simulation(plan_simulation(_config(interrupted, rounds=2, resume=True)))
    return straight, interrupted


def test_resumed_run_matches_an_uninterrupted_one(runs: tuple[Path, Path]) -> None:
    straight, interrupted = runs
    a = np.load(straight / "checkpoints" / "encoder-round-0002.npz")
    b = np.load(interrupted / "checkpoints" / "encoder-round-0002.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])  # same encoder, FedAdam moments and round numbers
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((interrupted / "summary.json").read_text())
    assert sb["rounds"] == 2 and len(sb["seconds_per_round"]) == 2
    for name, metrics in sa["institutions"].items():
        # Accounting continued: the interrupted run also released its evaluation after its (then last) round 1,
        # so its ε is the straight run's history plus exactly one more Gaussian release.
        history = json.loads((straight / "institutions" / name / "privacy.json").read_text())["accountant_state"]
        extra = AccountantState.from_dict(history).with_steps(noise_multiplier=5.0, sample_rate=1.0, steps=1)
        assert sb["institutions"][name]["epsilon"] == pytest.approx(epsilon_of(extra, delta=1e-5), rel=1e-6)
        # Metrics carry fresh secret noise, so only the kept model's round is comparable: the straight run released
        # once (round 2); the interrupted one twice and keeps the better of the two by its DP validation score.
        assert metrics["model_round"] == 2 and sb["institutions"][name]["model_round"] in (1, 2)
    lines = [json.loads(x) for x in (interrupted / "rounds.jsonl").read_text().splitlines()]
    assert sorted({(r["round"], r["phase"]) for r in lines}) == [
        (1, "evaluate"),  # the first leg's last round
        (1, "train"),
        (2, "evaluate"),
        (2, "train"),
    ]
    state = json.loads((interrupted / "checkpoints" / STATE_FILE).read_text())
    assert state["round"] == 2 and state["run_name"] == "r1"
    moments = np.load(interrupted / "checkpoints" / "strategy-round-0002.npz")
    assert any("/m_t/" in k for k in moments.files) and any("/v_t/" in k for k in moments.files)


def test_resume_refuses_another_run_or_a_changed_config(runs: tuple[Path, Path]) -> None:
    _, interrupted = runs
    config = _config(interrupted, rounds=3, resume=True)
    assert load_resume_point(config, interrupted).completed_round == 2
    other = apply_overrides(config, {"federation.run_name": "r2"})
    with pytest.raises(ConfigError, match="belongs to run 'r1'"):
        load_resume_point(other, interrupted)
    changed = apply_overrides(config, {"privacy.noise_multiplier": 2.0})
    assert config_fingerprint(changed) != config_fingerprint(config)
    with pytest.raises(ConfigError, match="config differs"):
        load_resume_point(changed, interrupted)
    with pytest.raises(ConfigError, match="already completed 2 rounds"):
        load_resume_point(_config(interrupted, rounds=1, resume=True), interrupted)


def _copy(interrupted: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(interrupted, target)
    return target


def _resume_config(folder: Path):
    return _config(folder, rounds=3, resume=True)


@pytest.mark.parametrize("damage", ["nan", "garbage"])
def test_a_bad_encoder_checkpoint_is_refused_naming_the_file(runs, tmp_path: Path, damage: str) -> None:
    from fedchurn.server.resume import ResumeError

    folder = _copy(runs[1], tmp_path)
    path = folder / "checkpoints" / "encoder-round-0002.npz"
    if damage == "nan":
        arrays = dict(np.load(path))
        first = sorted(arrays)[0]
        arrays[first] = np.full_like(arrays[first], np.nan)
        np.savez(path, **arrays)
    else:
        path.write_bytes(b"not an npz archive")
    with pytest.raises(ResumeError, match="encoder-round-0002.npz"):
        load_resume_point(_resume_config(folder), folder)


def test_a_wrong_shape_encoder_is_refused_before_anything_is_written(runs, tmp_path: Path) -> None:
    from fedchurn.server.resume import ResumableRun, ResumeError

    folder = _copy(runs[1], tmp_path)
    rounds_before = (folder / "rounds.jsonl").read_text()
    resumable = ResumableRun.prepare(_resume_config(folder), folder, flower_run_id=1)
    fresh = {key: np.zeros(value.shape) for key, value in resumable.point.arrays.items()}
    wrong = sorted(fresh)[0]
    fresh[wrong] = np.zeros((*fresh[wrong].shape, 2))
    with pytest.raises(ResumeError, match=f"encoder-round-0002.npz: '{wrong}' has shape"):
        resumable.arrays_or(fresh)
    assert (folder / "rounds.jsonl").read_text() == rounds_before


@pytest.mark.parametrize(
    ("relative", "content", "match"),
    [
        ("checkpoints/server-state.json", '{"format": 1, "round": 2}', "server-state.json is not a valid"),
        ("checkpoints/server-state.json", "[1, 2", "server-state.json is unreadable"),
        ("checkpoints/strategy-round-0002.npz", "junk", "strategy-round-0002.npz is unreadable"),
        ("rounds.jsonl", "{not json\n", "rounds.jsonl, line 1"),
    ],
)
def test_every_bad_resume_input_is_refused_naming_the_file(
    runs, tmp_path: Path, relative: str, content: str, match: str
) -> None:
    from fedchurn.server.resume import ResumeError

    folder = _copy(runs[1], tmp_path)
    (folder / relative).write_text(content)
    with pytest.raises(ResumeError, match=match):
        load_resume_point(_resume_config(folder), folder)


def test_a_new_run_refuses_a_folder_holding_an_earlier_run(runs) -> None:
    from fedchurn.server.resume import check_new_run_folder

    with pytest.raises(ConfigError, match="already holds an earlier run"):
        check_new_run_folder(runs[1])


def test_the_interrupted_round_is_in_the_consortium_ledger_once(tmp_path: Path) -> None:
    from fedchurn.server.privacy_oversight import set_aside_abandoned_rounds
    from fedchurn.shared.ledger import JsonlChain

    path = tmp_path / "consortium_ledger.jsonl"
    chain = JsonlChain(path, fresh=True)
    for server_round, bank in [(1, "a"), (1, "b"), (2, "a"), (2, "b")]:
        chain.append({"kind": "train", "round": server_round, "institution": bank, "epsilon": 0.5})
    # The server died in round 2's evaluate phase: round 2 is trained again after the resume.
    side = set_aside_abandoned_rounds(path, completed_round=1)
    kept = JsonlChain(path)
    assert [(e.record["round"], e.record["institution"]) for e in kept.entries()] == [(1, "a"), (1, "b")]
    assert kept.verify() == []
    assert side is not None and len(side.read_text().splitlines()) == 2  # kept aside, not lost
    kept.append({"kind": "train", "round": 2, "institution": "a", "epsilon": 0.7})
    assert JsonlChain(path).verify() == [] and len(JsonlChain(path).entries()) == 3
    assert set_aside_abandoned_rounds(path, completed_round=2) is None
