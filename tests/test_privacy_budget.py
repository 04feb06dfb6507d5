"""Privacy ledger, budgets, declines, audit, `fedchurn privacy`, institution-level DP.

References are independent: the published vectors beside the repo (Opacus RDP/PRV, Google dp-accounting PLD),
dp-accounting for the Gaussian composition, hand-computed weights and hashes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedchurn.auditing.independent_accounting import gaussian_epsilon
from fedchurn.cli.main import main
from fedchurn.clients.app import make_client_app
from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.training import steps_per_round
from fedchurn.server.app import initial_encoder
from fedchurn.server.institution_dp import InstitutionLevelDP, gaussian_composition_epsilon
from fedchurn.server.privacy_oversight import DeclineScreen, PrivacyOversight
from fedchurn.server.report import RunRecorder
from fedchurn.server.strategy import make_strategy
from fedchurn.shared.config import BudgetConfig, FedChurnConfig, InstitutionDPConfig, SyntheticConfig, default_config
from fedchurn.shared.decline import DECLINE_METRICS
from fedchurn.shared.errors import ConfigError
from fedchurn.shared.institution_rows import resolve_schema
from fedchurn.shared.ledger import GENESIS, InstitutionLedger, canonical_json
from fedchurn.shared.privacy_accounting import compute_epsilon, sample_rate_for
from fedchurn.shared.wire import TRAIN_METRICS, from_array_record, identity_record, to_array_record

OPACUS_PRV_EPS_ERROR = 0.01  # Opacus' PRVAccountant default: its ε lies in [estimate - 0.01, estimate + 0.01]


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


# --------------------------------------------------------------------------------------------------
# fedchurn privacy epsilon | plan
# --------------------------------------------------------------------------------------------------


def _cli_epsilon(capsys, vector: dict, accountant: str) -> float:
    argv = [
        "privacy",
        "epsilon",
        "--noise-multiplier",
        repr(vector["noise_multiplier"]),
        "--sample-rate",
        repr(vector["sample_rate"]),
        "--steps",
        str(vector["steps"]),
        "--delta",
        repr(vector["delta"]),
        "--accountant",
        accountant,
        "--json",
    ]
    assert main(argv) == 0
    return float(json.loads(capsys.readouterr().out)["epsilon"])


def test_privacy_epsilon_matches_the_published_vectors(privacy_vectors, capsys) -> None:
    for vector in privacy_vectors:
        name = vector["name"]
        rdp = _cli_epsilon(capsys, vector, "rdp")
        assert rdp == pytest.approx(vector["eps_opacus_rdp"], rel=1e-3), name
        pld = _cli_epsilon(capsys, vector, "pld")
        assert pld == pytest.approx(vector["eps_dpacc_pld"], rel=1e-4), name
        prv = _cli_epsilon(capsys, vector, "prv")
        # PRV is an upper bound within its stated error band (2 x eps_error wide) of the tightest value, PLD.
        assert vector["eps_dpacc_pld"] - 1e-6 <= prv <= vector["eps_dpacc_pld"] + 2 * OPACUS_PRV_EPS_ERROR, name
        assert pld <= prv <= rdp, name


def test_privacy_plan_inverts_a_published_vector(capsys) -> None:
    # Opacus' unit test: σ = 1.5, q = 0.04, 2250 steps, δ = 1e-5 -> ε_RDP = 7.32911 (90 rounds x 25 steps).
    argv = ["privacy", "plan", "--target-epsilon", "7.32912", "--rounds", "90", "--sample-rate", "0.04"]
    argv += ["--steps-per-round", "25", "--delta", "1e-5", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["steps"] == 2250
    assert plan["noise_multiplier"] == pytest.approx(1.5, rel=0.01)
    assert plan["epsilon"] <= 7.32912


# --------------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------------


def _ledger(tmp_path: Path, n: int = 3) -> InstitutionLedger:
    ledger = InstitutionLedger.in_folder(tmp_path / "bank")
    for k in range(1, n + 1):
        ledger.append({"round": k, "epsilon": 0.5 * k})
    return ledger


def _raw(ledger: InstitutionLedger, sql: str, *params) -> None:
    db = sqlite3.connect(ledger.path)
    db.executescript("DROP TRIGGER IF EXISTS ledger_no_update; DROP TRIGGER IF EXISTS ledger_no_delete;")
    db.execute(sql, params)
    db.commit()
    db.close()


def test_ledger_chain_is_sha256_of_previous_hash_and_canonical_record(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, n=2)
    first, second = ledger.entries()
    text = '{"epsilon":0.5,"round":1,"seq":1}'
    assert first.record_json == text
    assert first.hash == hashlib.sha256((GENESIS + "\n" + text).encode()).hexdigest()
    assert second.prev_hash == first.hash
    assert ledger.verify() == []
    assert canonical_json({"b": 1, "a": float("inf")}) == '{"a":null,"b":1}'


def test_ledger_refuses_update_and_delete(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    db = sqlite3.connect(ledger.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE ledger SET record = '{}' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM ledger WHERE seq = 1")
    db.close()


def test_ledger_detects_edit_deletion_and_reordering(tmp_path: Path) -> None:
    edited = _ledger(tmp_path / "edit")
    _raw(edited, "UPDATE ledger SET record = ? WHERE seq = 2", '{"epsilon":0.1,"round":2,"seq":2}')
    assert [p.seq for p in edited.verify()] == [2]

    deleted = _ledger(tmp_path / "delete")
    _raw(deleted, "DELETE FROM ledger WHERE seq = 2")
    assert {p.seq for p in deleted.verify()} == {3}

    reordered = _ledger(tmp_path / "reorder")
    one, two = reordered.entries()[:2]
    _raw(reordered, "DELETE FROM ledger WHERE seq IN (1, 2)")
    for seq, entry in ((1, two), (2, one)):
        _raw(reordered, "INSERT INTO ledger VALUES (?, ?, ?, ?)", seq, entry.record_json, entry.prev_hash, entry.hash)
    assert {p.seq for p in reordered.verify()} >= {1, 2}


# --------------------------------------------------------------------------------------------------
# Budgets, enforced by the ClientApp; declines, recorded by the server; the audit
# --------------------------------------------------------------------------------------------------

ROUNDS = 4


def _bank_key(config: FedChurnConfig, name: str) -> bytes:
    """The virtual bank's secret split key (its state folder), as the bank itself reads it."""
    from fedchurn.shared.bank_random import bank_secret_key

    return bank_secret_key(Path(config.output_dir) / "institutions" / name)[0]


def _config(tmp_path: Path, budget: BudgetConfig) -> FedChurnConfig:
    base = default_config()
    data = dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=300, max_rows=500))
    return dataclasses.replace(base, output_dir=str(tmp_path / "run"), data=data, rounds=ROUNDS, budget=budget)


def _epsilon_after(config: FedChurnConfig, name: str, rounds: int) -> float:
    """ε after ``rounds`` rounds, from the institution's size: the reference the budget is set against."""
    n = len(prepare_institution(config, name, split_key=_bank_key(config, name)).y_train)
    q = sample_rate_for(dataset_size=n, batch_size=config.training.batch_size)
    per_round = steps_per_round(n_train=n, batch_size=config.training.batch_size, local_epochs=1)
    return compute_epsilon(
        noise_multiplier=config.privacy.noise_multiplier, sample_rate=q, steps=rounds * per_round, delta=1e-5
    )


def _context(config: FedChurnConfig, partition: int) -> Context:
    from fedchurn.shared.config import config_to_run_config

    return Context(
        run_id=31,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 2},
        state=RecordDict(),
        run_config=config_to_run_config(config),
    )


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory: pytest.TempPathFactory):
    """Two banks, four rounds; bank-01's budget fits two rounds, bank-02's all four."""
    tmp_path = tmp_path_factory.mktemp("budget")
    probe = _config(tmp_path, BudgetConfig())
    two, three = _epsilon_after(probe, "bank-01", 2), _epsilon_after(probe, "bank-01", 3)
    budget = BudgetConfig(max_epsilon=(two + three) / 2, institution_epsilon={"bank-02": 50.0})
    config = _config(tmp_path, budget)
    app = make_client_app()
    contexts = [_context(config, 0), _context(config, 1)]
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)

    recorder = RunRecorder(Path(config.output_dir), rounds=ROUNDS)
    inner = make_strategy(config.strategy, observer=recorder, min_available=1)
    oversight = PrivacyOversight(config, Path(config.output_dir), run_id=31)
    strategy = oversight.wrap(inner)
    replies: dict[tuple[str, int], Message] = {}
    for server_round in range(1, ROUNDS + 1):
        inner._reference = encoder  # what configure_train records when a grid sends the round
        sent = RecordDict({"arrays": to_array_record(encoder), "config": ConfigRecord({"server-round": server_round})})
        round_replies = []
        for partition, context in enumerate(contexts):
            message = Message(content=sent, dst_node_id=context.node_id, message_type=MessageType.TRAIN)
            (message,) = oversight.with_countersignatures([message])  # last round's record, countersigned
            reply = app(message, context)
            assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
            replies[(f"bank-0{partition + 1}", server_round)] = reply
            round_replies.append(reply)
        arrays, _ = strategy.aggregate_train(server_round, round_replies)
        encoder = from_array_record(arrays)
    summary = recorder.summary(extra=oversight.summary())
    recorder.write_summary({**summary, "run_id": 31})
    return config, budget, replies, recorder, oversight, (two, three)


def test_budget_stops_the_right_institution_at_the_right_round(budget_run) -> None:
    config, budget, replies, recorder, oversight, (two, three) = budget_run
    assert two < budget.max_epsilon < three
    for server_round in (1, 2):
        assert set(replies[("bank-01", server_round)].content.array_records) == {"arrays"}
    for server_round in (3, 4):
        content = replies[("bank-01", server_round)].content
        assert set(content.array_records) == set(), "a decline sends no weights"
        assert dict(content["status"]) == {"status": "declined", "reason": "budget-exhausted"}
        assert set(content["metrics"]) == set(DECLINE_METRICS)
        assert content["metrics"]["epsilon"] == pytest.approx(two, rel=1e-9)
        assert content["metrics"]["projected-epsilon"] == pytest.approx(three, rel=1e-9)
    for server_round in range(1, ROUNDS + 1):  # bank-02 trains every round
        assert set(replies[("bank-02", server_round)].content.array_records) == {"arrays"}

    assert recorder.dropped == [], "a decline is not a malformed reply"
    stopped = oversight.summary()["budget"]["stopped"]
    assert list(stopped) == ["bank-01"]
    assert stopped["bank-01"]["round"] == 3
    assert stopped["bank-01"]["epsilon"] == pytest.approx(two, rel=1e-9)
    assert stopped["bank-01"]["max_epsilon"] == budget.max_epsilon
    assert len(oversight.declines) == 2  # rounds 3 and 4

    folder = Path(config.output_dir) / "institutions"
    assert len(InstitutionLedger.in_folder(folder / "bank-01").entries()) == 2
    assert len(InstitutionLedger.in_folder(folder / "bank-02").entries()) == ROUNDS
    final = InstitutionLedger.in_folder(folder / "bank-01").entries()[-1].record
    assert final["epsilon"] <= budget.max_epsilon
    assert final["epsilon"] == pytest.approx(two, rel=1e-9)
    assert {"noise_multiplier", "sample_rate", "steps", "clipping_norm", "delta", "sampling", "accountant"} <= set(
        final
    )
    assert final["sampling"] == "poisson" and final["dataset_size"] > 0 and "opacus" in final["versions"]


def test_audit_passes_the_clean_run_and_writes_reports(budget_run, capsys) -> None:
    config, budget, *_ = budget_run
    run_dir = Path(config.output_dir)
    assert main(["audit", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is True
    by_name = {i["institution"]: i for i in result["institutions"]}
    assert len(by_name["bank-01"]["rounds"]) == 2 and len(by_name["bank-02"]["rounds"]) == ROUNDS
    assert by_name["bank-01"]["stopped"]["round"] == 3
    for entry in by_name.values():
        assert entry["epsilon_pld_independent"] <= entry["epsilon"] <= entry["epsilon_rdp_independent"] * 1.001
    assert by_name["bank-01"]["budget_remaining"] == pytest.approx(budget.max_epsilon - by_name["bank-01"]["epsilon"])
    report = (run_dir / "audit" / "bank-01.md").read_text()
    for phrase in ("one customer row", "Poisson", "Not covered", "Budget remaining", "rdp"):
        assert phrase in report
    assert (run_dir / "audit" / "bank-01-epsilon.png").read_bytes()[:4] == b"\x89PNG"


def _tampered_copy(budget_run, tmp_path: Path) -> tuple[Path, InstitutionLedger]:
    config = budget_run[0]
    copy = tmp_path / "copy"
    shutil.copytree(config.output_dir, copy)
    return copy, InstitutionLedger.in_folder(copy / "institutions" / "bank-02")


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "truncate"])
def test_audit_fails_a_tampered_ledger_naming_the_record(budget_run, tmp_path: Path, tamper: str, capsys) -> None:
    run_dir, ledger = _tampered_copy(budget_run, tmp_path)
    entries = ledger.entries()
    if tamper == "edit":  # lower round 2's ε, keep everything else
        record = entries[1].record
        record["epsilon"] = record["epsilon"] / 2
        _raw(ledger, "UPDATE ledger SET record = ? WHERE seq = 2", canonical_json(record))
        expected = "record 2"
    elif tamper == "delete":
        _raw(ledger, "DELETE FROM ledger WHERE seq = 2")
        expected = "record 3"
    elif tamper == "reorder":
        _raw(ledger, "DELETE FROM ledger WHERE seq IN (2, 3)")
        for seq, entry in ((2, entries[2]), (3, entries[1])):
            _raw(ledger, "INSERT INTO ledger VALUES (?, ?, ?, ?)", seq, entry.record_json, entry.prev_hash, entry.hash)
        expected = "record 2"
    else:  # the last record removed: the chain is intact, the cross-checks are not
        _raw(ledger, f"DELETE FROM ledger WHERE seq = {len(entries)}")
        expected = f"round {ROUNDS}"
    assert main(["audit", str(run_dir), "--no-reports"]) == 1
    out = capsys.readouterr().out
    assert "FAIL bank-02" in out and expected in out
    assert "ok   bank-01" in out, "the other institution's ledger still passes"


def test_decline_with_extra_metrics_is_dropped_as_malformed(budget_run) -> None:
    config = budget_run[0]
    recorder = RunRecorder(Path(config.output_dir) / "malformed", rounds=1)
    oversight = PrivacyOversight(config, Path(config.output_dir) / "malformed", run_id=1)
    strategy = oversight.wrap(make_strategy(config.strategy, observer=recorder, min_available=1))
    metrics = dict.fromkeys(DECLINE_METRICS, 1.0) | {"auc": 0.9}  # a number outside the whitelist
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "identity": identity_record("bank-01"),
            "status": ConfigRecord({"status": "declined", "reason": "budget-exhausted"}),
        }
    )
    reply = Message(content=content, reply_to=Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN))
    assert isinstance(strategy, DeclineScreen)
    strategy.aggregate_train(1, [reply])
    assert oversight.declines == []
    assert len(recorder.dropped) == 1 and "whitelist" not in recorder.dropped[0]["reason"]
    assert "exactly" in recorder.dropped[0]["reason"]


def test_budget_config_names_key_value_and_rule() -> None:
    with pytest.raises(ConfigError, match=r"budget.institution_epsilon.bank-01' = -1.0: must be in \(0, 1000\]"):
        BudgetConfig(institution_epsilon={"bank-01": -1.0})
    assert BudgetConfig(max_epsilon=3.0, institution_epsilon={"b": 5.0}).epsilon_for("a") == 3.0
    assert BudgetConfig(max_epsilon=3.0, institution_epsilon={"b": 5.0}).epsilon_for("b") == 5.0


# --------------------------------------------------------------------------------------------------
# Institution-level DP at the server
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigmas", [[1.0], [2.0] * 5, [0.8, 1.5, 3.0]])
def test_gaussian_composition_matches_dp_accounting(sigmas: list[float]) -> None:
    exact = gaussian_composition_epsilon(sigmas, delta=1e-5)
    independent = gaussian_epsilon(sigmas, delta=1e-5)  # pessimistic PLD: never below the exact value
    assert exact <= independent + 1e-9
    assert independent == pytest.approx(exact, abs=5e-3)


KEYS = ("encoder.layers.0.weight", "encoder.layers.0.bias")


def _fake_reply(name: str, value: float, n: float, node: int) -> Message:
    arrays = {KEYS[0]: np.full((2, 3), value, dtype=np.float32), KEYS[1]: np.full((2,), value, dtype=np.float32)}
    metrics = dict.fromkeys(TRAIN_METRICS, 0.0) | {"num-examples": n}
    content = RecordDict(
        {"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics), "identity": identity_record(name)}
    )
    return Message(content=content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def test_institution_level_dp_clips_adds_noise_and_accounts(tmp_path: Path) -> None:
    base = default_config()
    config = dataclasses.replace(
        base, institution_dp=InstitutionDPConfig(enabled=True, noise_multiplier=1.0, clipping_norm=0.1)
    )
    recorder = RunRecorder(tmp_path, rounds=1)
    oversight = PrivacyOversight(config, tmp_path, run_id=1)
    inner = make_strategy(config.strategy, observer=recorder, min_available=1)
    strategy = oversight.wrap(inner)
    assert isinstance(strategy.strategy, InstitutionLevelDP)  # type: ignore[attr-defined]
    zero = {KEYS[0]: np.zeros((2, 3), np.float32), KEYS[1]: np.zeros((2,), np.float32)}
    strategy.strategy.current_arrays = to_array_record(zero)  # type: ignore[attr-defined]
    inner._reference = zero
    bad = _fake_reply("bank-03", 1.0, 100.0, 3)
    bad.content["arrays"] = to_array_record({KEYS[0]: np.zeros((5,), np.float32)})  # wrong shape: dropped, no crash
    arrays, _ = strategy.aggregate_train(
        1, [_fake_reply("bank-01", 1.0, 100.0, 1), _fake_reply("bank-02", -1.0, 300.0, 2), bad]
    )
    assert [d["institution"] for d in recorder.dropped] == ["bank-03"]
    # Two updates, each clipped to norm 0.1 (8 entries of ±1 -> ±0.1/sqrt(8)); weights 1/4 and 3/4.
    clean = (0.25 - 0.75) * 0.1 / math.sqrt(8)
    got = from_array_record(arrays)[KEYS[0]]
    assert not np.allclose(got, clean), "noise was added"
    (release,) = oversight.releases
    assert release.contributors == 2
    assert release.max_weight_share == pytest.approx(0.75)
    assert release.noise_std == pytest.approx(1.0 * 0.1 / 2)
    assert release.effective_noise_multiplier == pytest.approx(1.0 / (2 * 0.75))
    section = oversight.summary()["institution_dp"]
    assert section["epsilon"] == pytest.approx(gaussian_epsilon([1 / 1.5], delta=1e-5), abs=5e-3)
    assert "NOT per customer" in section["guarantee"]


def test_institution_level_dp_refuses_a_server_optimizer(tmp_path: Path) -> None:
    base = default_config()
    config = dataclasses.replace(
        base,
        strategy=dataclasses.replace(base.strategy, name="fedadam"),
        institution_dp=InstitutionDPConfig(enabled=True),
    )
    oversight = PrivacyOversight(config, tmp_path, run_id=1)
    with pytest.raises(ConfigError, match="institution_dp.enabled"):
        oversight.wrap(make_strategy(config.strategy, observer=None, min_available=1))


# --------------------------------------------------------------------------------------------------
# The same, on Flower's Ray backend
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~10 s alone, several times that on a loaded 2-core machine: run with -m slow
@pytest.mark.filterwarnings("ignore")
def test_ray_simulation_stops_institutions_at_their_budget_and_audits_clean(tmp_path: Path) -> None:
    from fedchurn.simulation.driver import plan_simulation, run_simulation

    base = default_config()
    config = dataclasses.replace(
        base,
        rounds=3,
        seed=5,
        output_dir=str(tmp_path / "ray-run"),
        data=dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=3, min_rows=300, max_rows=900)),
        simulation=dataclasses.replace(base.simulation, ray_num_cpus=2),
        budget=BudgetConfig(max_epsilon=4.0),
    )
    summary = run_simulation(plan_simulation(config))
    stopped = summary["budget"]["stopped"]
    for name in summary["institutions"]:
        # The first round k whose projected ε (k rounds, from the institution's own size) exceeds the budget.
        over = [k for k in range(1, config.rounds + 1) if _epsilon_after(config, name, k) > 4.0]
        if over:
            assert stopped[name]["round"] == over[0], name
            assert stopped[name]["epsilon"] == pytest.approx(_epsilon_after(config, name, over[0] - 1), rel=1e-9)
        else:
            assert name not in stopped
        assert summary["institutions"][name]["epsilon"] <= 4.0
    assert stopped, "the budget is tight enough to stop someone"
    assert summary["dropped_replies"] == []
    assert main(["audit", config.output_dir, "--no-reports"]) == 0
