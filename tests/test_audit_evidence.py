"""`fedchurn audit` against one party rewriting history: signatures, cross-anchors, and records against what ran.

The attack of issue 10: change a bank's σ from 1.2 to 3.0 in its ledger, its state file and the consortium ledger,
recompute every hash so that each chain is consistent — the audit used to pass. Now each record is signed by the
bank and countersigned by the consortium over its ORIGINAL hash, so a party holding only its own key cannot make
the rewrite verify.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedchurn.auditing.evidence import check_what_ran, lifetime_epsilon
from fedchurn.auditing.findings import InstitutionAudit
from fedchurn.auditing.run_audit import audit_run
from fedchurn.cli.main import main
from fedchurn.clients.app import make_client_app
from fedchurn.server.app import initial_encoder
from fedchurn.server.privacy_oversight import PrivacyOversight
from fedchurn.server.report import RunRecorder
from fedchurn.server.strategy import make_strategy
from fedchurn.shared.config import FedChurnConfig, SyntheticConfig, config_to_run_config, default_config, dump_config
from fedchurn.shared.institution_rows import resolve_schema
from fedchurn.shared.ledger import CONSORTIUM_LEDGER_FILE, InstitutionLedger, JsonlChain
from fedchurn.shared.ledger_signing import (
    BANK_KEY_FILE,
    CONSORTIUM_KEY_FILE,
    fingerprint,
    load_or_create_signer,
    load_signer,
)
from fedchurn.shared.privacy_accounting import AccountantState, MechanismStep, compute_epsilon, epsilon_of
from fedchurn.shared.wire import from_array_record, to_array_record

ROUNDS = 3
RUN_ID = 41


@pytest.fixture(autouse=True, scope="module")
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _config(tmp_path: Path) -> FedChurnConfig:
    base = default_config()
    data = dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=300, max_rows=400))
    return dataclasses.replace(base, output_dir=str(tmp_path / "run"), data=data, rounds=ROUNDS)


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two banks, three rounds, through the real ClientApp and the server's oversight (train, then evaluate)."""
    config = _config(tmp_path_factory.mktemp("signed"))
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")  # as server/app.py writes it
    app = make_client_app()
    contexts = [
        Context(
            run_id=RUN_ID,
            node_id=100 + p,
            node_config={"partition-id": p, "num-partitions": 2},
            state=RecordDict(),
            run_config=config_to_run_config(config),
        )
        for p in (0, 1)
    ]
    recorder = RunRecorder(run_dir, rounds=ROUNDS)
    inner = make_strategy(config.strategy, observer=recorder, min_available=1)
    oversight = PrivacyOversight(config, run_dir, run_id=RUN_ID)
    strategy = oversight.wrap(inner)
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    for server_round in range(1, ROUNDS + 1):
        inner._reference = encoder
        replies = []
        for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
            sent = RecordDict(
                {"arrays": to_array_record(encoder), "config": ConfigRecord({"server-round": server_round})}
            )
            messages = [Message(content=sent, dst_node_id=c.node_id, message_type=message_type) for c in contexts]
            for message, context in zip(oversight.with_countersignatures(messages), contexts, strict=True):
                reply = app(message, context)
                assert not reply.has_error()
                if message_type == MessageType.TRAIN:
                    replies.append(reply)
            if message_type == MessageType.TRAIN:
                arrays, _ = strategy.aggregate_train(server_round, replies)
                encoder = from_array_record(arrays)
    recorder.write_summary({**recorder.summary(extra=oversight.summary()), "run_id": RUN_ID})
    return run_dir


def test_audit_command_shows_progress_per_bank_on_stderr(signed_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(signed_run), "--no-reports", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["passed"] is True  # stdout holds the JSON alone
    for index, name in enumerate(("bank-01", "bank-02"), start=1):
        assert f"auditing {name} ({index}/2)" in captured.err
        assert f"{name}: recomposing ε over {ROUNDS + 1} records" in captured.err


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def test_clean_run_is_signed_countersigned_and_passes(signed_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audit = audit_run(signed_run)
    assert audit.passed, [(i.tampering, i.findings) for i in audit.institutions]
    for inst in audit.institutions:
        # ROUNDS training records, all countersigned, and the run's one evaluation release (after the last round),
        # signed by the bank and anchored by the chain only.
        assert inst.signatures["signed"] == inst.signatures["records"] == ROUNDS + 1
        assert inst.signatures["countersigned"] == inst.signatures["training_records"] == ROUNDS
        assert inst.signatures["pending_countersignature"] == [ROUNDS + 1]
        assert inst.lifetime_epsilon == pytest.approx(inst.epsilon, rel=1e-9) and inst.lifetime_runs == 1
    consortium = JsonlChain(signed_run / CONSORTIUM_LEDGER_FILE).entries()
    trains = [e.record for e in consortium if e.record.get("kind") == "train"]
    assert len(trains) == 2 * ROUNDS and all(r["bank_ledger"] and r["consortium_countersignature"] for r in trains)
    # A bank's folder alone, with the fingerprint the consortium publishes.
    published = fingerprint(load_signer(signed_run / CONSORTIUM_KEY_FILE, "consortium").public_key)
    bank = signed_run / "institutions" / "bank-01"
    assert main(["audit", str(bank), "--no-reports", "--consortium-key", str(published)]) == 0
    assert "countersigned by the consortium 3/3 training records" in capsys.readouterr().out
    assert main(["audit", str(bank), "--no-reports", "--consortium-key", "0" * 64]) == 1


def _rewrite_bank(folder: Path, *, sigma: float, bank_key: Path, fake_consortium_key: Path | None = None) -> None:
    """What a bank can do alone: rebuild its ledger with σ changed, re-chained and re-signed with its own key."""
    ledger = InstitutionLedger.in_folder(folder)
    entries = ledger.entries()
    countersigned = ledger.countersignatures()
    pinned = ledger.pinned_consortium_key()
    records = [e.record for e in entries]
    ledger.path.unlink()
    signer = load_signer(bank_key, "bank")
    history: list[MechanismStep] = []
    new_hashes = []
    for record in records:
        history.append(MechanismStep(noise_multiplier=sigma, sample_rate=record["sample_rate"], steps=record["steps"]))
        record["noise_multiplier"] = sigma
        record["epsilon"] = epsilon_of(AccountantState(accountant="rdp", history=tuple(history)), delta=1e-5)
        new_hashes.append(ledger.append({k: v for k, v in record.items() if k != "seq"}, sign=signer.sign).hash)
    with sqlite3.connect(ledger.path) as db:
        if fake_consortium_key is None:  # it cannot countersign: it keeps the consortium's old countersignatures
            for seq, signed in countersigned.items():
                db.execute("INSERT INTO countersignatures VALUES (?, ?, ?, ?)", (seq, *signed.to_wire().values()))
            db.execute("INSERT INTO meta VALUES ('consortium_public_key', ?)", (pinned,))
        else:  # or it forges them with a key of its own and pins that
            fake = load_or_create_signer(fake_consortium_key, "consortium")
            for seq, new_hash in enumerate(new_hashes, start=1):
                db.execute(
                    "INSERT INTO countersignatures VALUES (?, ?, ?, ?)", (seq, *fake.sign(new_hash).to_wire().values())
                )
            db.execute("INSERT INTO meta VALUES ('consortium_public_key', ?)", (fake.public_key,))
    state = json.loads((folder / "privacy.json").read_text())
    for step in state["accountant_state"]["history"]:
        step["noise_multiplier"] = sigma
    state["epsilon"] = records[-1]["epsilon"]
    (folder / "privacy.json").write_text(json.dumps(state))


def _rewrite_consortium(run_dir: Path, name: str, sigma: float, epsilons: list[float]) -> None:
    """The consortium ledger made to agree, and re-chained from the start."""
    path = run_dir / CONSORTIUM_LEDGER_FILE
    records = [e.record for e in JsonlChain(path).entries()]
    chain = JsonlChain(path, fresh=True)
    rounds = iter(epsilons)
    for record in records:
        if record.get("kind") == "train" and record.get("institution") == name:
            record["noise-multiplier"] = sigma
            record["epsilon"] = next(rounds)
        chain.append({k: v for k, v in record.items() if k != "seq"})


def _epsilons(folder: Path) -> list[float]:
    return [e.record["epsilon"] for e in InstitutionLedger.in_folder(folder).entries()]


def test_sigma_rewritten_consistently_by_the_bank_fails_the_audit(
    signed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy(signed_run, tmp_path)
    folder = run_dir / "institutions" / "bank-02"
    before = _epsilons(folder)[-1]
    _rewrite_bank(folder, sigma=3.0, bank_key=folder / BANK_KEY_FILE)
    _rewrite_consortium(run_dir, "bank-02", 3.0, _epsilons(folder))
    after = _epsilons(folder)[-1]
    assert after < before / 2  # what the rewrite would have bought
    assert (
        InstitutionLedger.in_folder(folder).verify() == []
        and JsonlChain(run_dir / CONSORTIUM_LEDGER_FILE).verify() == []
    )

    assert main(["audit", str(run_dir), "--no-reports"]) == 1
    out = capsys.readouterr().out
    assert "FAIL bank-02" in out and "the consortium countersigned a different record" in out
    assert "ok   bank-01" in out
    assert "different record than the ledger's" in out  # the consortium's copies of the bank's signed hashes
    # The bank's folder alone fails too: the consortium's countersignatures are over the original hashes.
    assert main(["audit", str(folder), "--no-reports"]) == 1


def _drop_triggers(db: sqlite3.Connection, table: str) -> None:
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (table,)):
        db.execute(f'DROP TRIGGER "{name}"')


def test_bank_rewriting_and_removing_every_countersignature_fails_on_its_folder_alone(
    signed_run: Path, tmp_path: Path
) -> None:
    run_dir = _copy(signed_run, tmp_path)
    folder = run_dir / "institutions" / "bank-02"
    _rewrite_bank(folder, sigma=3.0, bank_key=folder / BANK_KEY_FILE)
    ledger = InstitutionLedger.in_folder(folder)
    with sqlite3.connect(ledger.path) as db:  # the consortium's evidence, gone (the owner can drop any trigger)
        _drop_triggers(db, "countersignatures")
        db.execute("DELETE FROM countersignatures")
    assert ledger.verify() == []  # the chain itself is consistent again
    alone = audit_run(folder).institutions[0]
    assert not alone.passed and any("anchored by no countersignature" in p for p in alone.tampering)


def test_an_interrupted_round_without_its_countersignature_is_anchored_by_later_ones(
    signed_run: Path, tmp_path: Path
) -> None:
    """A server killed between train and evaluate never sends that record's countersignature: honest, passes."""
    run_dir = _copy(signed_run, tmp_path)
    folder = run_dir / "institutions" / "bank-02"
    ledger = InstitutionLedger.in_folder(folder)
    with sqlite3.connect(ledger.path) as db:
        _drop_triggers(db, "countersignatures")
        db.execute("DELETE FROM countersignatures WHERE seq = 1")
    audit = {i.name: i for i in audit_run(run_dir).institutions}["bank-02"]
    assert audit.passed, audit.tampering


def test_bank_forging_countersignatures_with_its_own_key_fails(signed_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(signed_run, tmp_path)
    folder = run_dir / "institutions" / "bank-02"
    _rewrite_bank(folder, sigma=3.0, bank_key=folder / BANK_KEY_FILE, fake_consortium_key=tmp_path / "fake.pem")
    _rewrite_consortium(run_dir, "bank-02", 3.0, _epsilons(folder))
    audit = {i.name: i for i in audit_run(run_dir).institutions}["bank-02"]
    assert not audit.passed and any("not the consortium's key" in p for p in audit.tampering)
    published = fingerprint(load_signer(signed_run / CONSORTIUM_KEY_FILE, "consortium").public_key)
    alone = audit_run(folder, consortium_fingerprint=published).institutions[0]
    assert any("published fingerprint" in p for p in alone.tampering)
    # Without the published fingerprint the bank's folder cannot tell: the audit says so rather than vouch for it.
    unpinned = audit_run(folder).institutions[0]
    assert any("--consortium-key" in note for note in unpinned.notes)


def test_server_rewriting_a_bank_ledger_with_its_own_keys_fails(signed_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(signed_run, tmp_path)
    folder = run_dir / "institutions" / "bank-01"
    # The server holds the consortium key but not the bank's: it signs "as the bank" with a key of its own.
    _rewrite_bank(
        folder,
        sigma=3.0,
        bank_key=_new_key(tmp_path / "server-made.pem"),
        fake_consortium_key=run_dir / CONSORTIUM_KEY_FILE,
    )
    _rewrite_consortium(run_dir, "bank-01", 3.0, _epsilons(folder))
    audit = {i.name: i for i in audit_run(run_dir).institutions}["bank-01"]
    assert not audit.passed
    assert any("other than the bank's own key file" in p for p in audit.tampering)
    assert any("different record than the ledger's" in p for p in audit.tampering)


def _new_key(path: Path) -> Path:
    load_or_create_signer(path, "bank")
    return path


def _record(**changes: Any) -> dict[str, Any]:
    n, batch = 300, 64
    record = {
        "seq": 1,
        "round": 1,
        "run_id": "a",
        "mechanism": "DP-SGD (Poisson-subsampled Gaussian)",
        "sampling": "poisson",
        "noise_multiplier": 1.2,
        "sample_rate": 1 / 5,  # 1/ceil(300/64)
        "steps": 5,
        "dataset_size": n,
        "batch_size": batch,
        "epochs_per_round": 1,
        "clipping_norm": 1.0,
        "delta": 1e-5,
        "accountant": "rdp",
    }
    return {**record, **changes}


@pytest.mark.parametrize(
    ("changes", "finding"),
    [
        ({}, None),
        ({"sample_rate": 64 / 300}, "1/ceil(300/64)"),  # B/n is not what the Poisson loader ran
        ({"steps": 4}, "1 × ceil(300/64) = 5"),
        ({"noise_multiplier": 0.0}, "without DP"),
        ({"mechanism": "none"}, "mechanism"),
        ({"epochs_per_round": 2, "steps": 10}, None),
    ],
)
def test_records_are_held_against_what_ran(changes: dict[str, Any], finding: str | None) -> None:
    audit = InstitutionAudit(name="b", ledger=Path("x"))
    check_what_ran([_record(**changes)], audit, None)
    if finding is None:
        assert audit.findings == []
    else:
        assert len(audit.findings) == 1 and finding in audit.findings[0]


def test_records_against_the_runs_config() -> None:
    audit = InstitutionAudit(name="b", ledger=Path("x"))
    config = default_config()
    config = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, noise_multiplier=3.0))
    check_what_ran([_record()], audit, config)
    assert audit.findings == ["record 1 (round 1): σ 1.2 but the run's config says 3.0"]


def test_lifetime_epsilon_composes_every_run_on_the_same_rows() -> None:
    audit = InstitutionAudit(name="b", ledger=Path("x"), accountant="rdp", delta=1e-5, max_epsilon=None)
    other_rows = _record(run_id="c", dataset_size=999, sample_rate=1 / 16, steps=16)  # not composed with the rest
    records = [other_rows, _record(run_id="a", round=1), _record(run_id="a", round=2), _record(run_id="b", round=1)]
    lifetime_epsilon(records, audit)
    expected = compute_epsilon(noise_multiplier=1.2, sample_rate=0.2, steps=15, delta=1e-5)
    assert audit.lifetime_epsilon == pytest.approx(expected, rel=1e-9) and audit.lifetime_runs == 2
    audit.max_epsilon = expected / 2
    audit.findings.clear()
    lifetime_epsilon(records, audit)
    assert any("exceeds the budget" in f for f in audit.findings)


def test_audit_empirical_puts_a_lower_bound_beside_the_claimed_epsilon(
    signed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy(signed_run, tmp_path)
    argv = ["audit", str(run_dir), "--empirical", "--institution", "bank-02", "--canaries", "100", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    by_name = {i["institution"]: i for i in result["institutions"]}
    assert by_name["bank-01"]["empirical"] is None
    empirical = by_name["bank-02"]["empirical"]
    assert empirical["dp_enabled"] is True and empirical["beta"] == 0.05 and empirical["black_box"]["m"] == 100
    assert 0.0 <= empirical["epsilon_lower_bound"] <= empirical["claimed_epsilon"]
    report = (run_dir / "audit" / "bank-02.md").read_text()
    assert "Empirical lower bound" in report and "Steinke" in report
    for phrase in (
        "one customer row",
        "Adjacency",
        "replace-one",
        "ε lifetime",
        "Not covered",
        "Countersigned by the consortium over the original record hash: 3/3 training records",
        "Sign-off",
    ):
        assert phrase in report, phrase
    page = (run_dir / "audit" / "bank-02.html").read_text()
    assert page.startswith("<!doctype html>") and "<table>" in page and "<h2>Sign-off</h2>" in page
    assert "**" not in page and "|---" not in page
