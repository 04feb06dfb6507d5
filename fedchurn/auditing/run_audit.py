"""`fedchurn audit`: re-check a run's privacy claims from each institution's own ledger, trusting nobody's numbers.

For every institution folder ``RUN_DIR/institutions/NAME`` holding a ``ledger.sqlite``:

1. the hash chain is verified (any edit, deletion or reordering names the record);
2. ε is recomposed from the recorded mechanism history (σ, q, steps of every round) with the accountant the
   institution used (Opacus, ``shared/privacy_accounting``) and must equal every recorded cumulative ε
   (relative tolerance :data:`SAME_ACCOUNTANT_RTOL`: same inputs, same deterministic computation);
3. the final ε is checked against an independent implementation, Google's dp-accounting
   (``fedchurn/auditing/independent_accounting``): it must not be below the PLD value minus :data:`BELOW_PLD_TOLERANCE`
   (PLD is the tightest valid ε: a reported ε under it is under-reported), and not above
   ``RDP_RATIO_LIMIT × ε_RDP + RDP_ABS_LIMIT`` with dp-accounting's own RDP (above a standard loose bound is
   not plausible for either Opacus accountant);
4. the ledger is held against what the institution's state (``privacy.json``) and the consortium
   (``consortium_ledger.jsonl``) say it trained, which catches records removed from the end of the chain;
5. the final ε must be within the budget the institution recorded;
6. signatures and cross-anchors (``fedchurn/auditing/evidence``): every record signed by the bank and countersigned
   by the consortium over its original hash, so a consistent re-chaining by one party alone fails;
7. the records against what ran (``fedchurn/auditing/evidence``): DP-SGD with σ > 0 in every round, q and steps
   re-derived from the recorded n, B and epochs, the run's ``config.yaml``, and the lifetime ε over every run on
   the same rows.

``audit_run`` takes a run folder, or one bank's folder alone (its ``ledger.sqlite`` and state, no server files):
then the consortium key is checked against a published fingerprint when one is given.

Institution-level DP (when the run used it) is recomposed from the consortium ledger with dp-accounting's PLD.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedchurn.auditing.evidence import check_signatures, check_what_ran, consortium_public_key, lifetime_epsilon
from fedchurn.auditing.findings import (
    BELOW_PLD_TOLERANCE,
    INSTITUTION_DP_TOLERANCE,
    RDP_ABS_LIMIT,
    RDP_RATIO_LIMIT,
    SAME_ACCOUNTANT_RTOL,
    InstitutionAudit,
    RoundRow,
    RunAudit,
)
from fedchurn.auditing.independent_accounting import gaussian_epsilon, pld_epsilon, rdp_epsilon
from fedchurn.shared.config import FedChurnConfig, load_config
from fedchurn.shared.errors import FedChurnError
from fedchurn.shared.ledger import (
    CONSORTIUM_LEDGER_FILE,
    LEDGER_FILE,
    ChainEntry,
    InstitutionLedger,
    JsonlChain,
    LedgerError,
)
from fedchurn.shared.privacy_accounting import AccountantState, MechanismStep, epsilon_of

__all__ = ["add_empirical", "audit_run"]


STATE_FILE = "privacy.json"  # written by clients/state.py
SUMMARY_FILE = "summary.json"
RUN_CONFIG_FILE = "config.yaml"  # written by the server (server/app.py)


def _close(a: float, b: float, rtol: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(1.0, abs(a), abs(b))


def _float(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    if value is None:
        return math.inf
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise FedChurnError(f"record {record.get('seq')}: {key} = {value!r} is not a number")
    return float(value)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def audit_run(run_dir: Path, *, consortium_fingerprint: str | None = None) -> RunAudit:
    """Audit every institution ledger under ``run_dir/institutions``, or one bank's folder alone (module doc)."""
    run_dir = Path(run_dir)
    if (run_dir / LEDGER_FILE).is_file():  # a bank's own folder: no server files, no summary
        audit = _audit_institution(
            run_dir, None, [], None, consortium_key=None, consortium_fingerprint=consortium_fingerprint, config=None
        )
        return RunAudit(run_dir=run_dir, run_id=audit.run_id, institutions=[audit])
    folders = sorted(p.parent for p in (run_dir / "institutions").glob(f"*/{LEDGER_FILE}"))
    if not folders:
        raise FedChurnError(
            f"no institution ledgers under {run_dir / 'institutions'} (expected NAME/{LEDGER_FILE}): "
            "is this a run folder of a run with DP enabled?"
        )
    summary = _read_json(run_dir / SUMMARY_FILE) or {}
    # The run identity: federation.run_name when the run had one (it survives a resume), else Flower's run id.
    run_id = summary.get("run_id") if isinstance(summary.get("run_id"), (int, str)) else None
    consortium, consortium_problems = _consortium(run_dir, run_id)
    stopped = (summary.get("budget") or {}).get("stopped") or {}
    consortium_key = consortium_public_key(run_dir, consortium)
    config = _run_config(run_dir, consortium_problems)
    audits = [
        _audit_institution(
            folder,
            run_id,
            consortium,
            stopped.get(folder.name),
            consortium_key=consortium_key,
            consortium_fingerprint=consortium_fingerprint,
            config=config,
        )
        for folder in folders
    ]
    return RunAudit(
        run_dir=run_dir,
        run_id=run_id,
        institutions=audits,
        consortium_problems=consortium_problems,
        institution_dp=_institution_dp(consortium, consortium_problems),
    )


def _run_config(run_dir: Path, problems: list[str]) -> FedChurnConfig | None:
    """The config the run was started with (``config.yaml``, written by the server), if the folder has it."""
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return load_config(path)
    except FedChurnError as exc:
        problems.append(f"{RUN_CONFIG_FILE} cannot be read: {exc}")
        return None


def _consortium(run_dir: Path, run_id: int | str | None) -> tuple[list[dict[str, Any]], list[str]]:
    path = run_dir / CONSORTIUM_LEDGER_FILE
    if not path.is_file():
        return [], []
    try:
        chain = JsonlChain(path)
        entries = chain.entries()
    except LedgerError as exc:
        return [], [str(exc)]
    problems = [f"{CONSORTIUM_LEDGER_FILE} {p}" for p in chain.verify()]
    records = [e.record for e in entries]
    if run_id is not None:
        records = [r for r in records if r.get("run_id") == run_id]
    return records, problems


def _institution_dp(consortium: list[dict[str, Any]], problems: list[str]) -> dict[str, Any] | None:
    releases = [r for r in consortium if r.get("kind") == "institution-dp"]
    if not releases:
        return None
    sigmas = [float(r["effective_noise_multiplier"]) for r in releases]
    delta = float(releases[-1]["delta"])
    recorded = releases[-1].get("epsilon")
    independent = gaussian_epsilon(sigmas, delta=delta)
    result = {
        "guarantee": "per institution (one institution's encoder update per round), not per customer",
        "releases": len(releases),
        "effective_noise_multipliers": sigmas,
        "delta": delta,
        "epsilon_recorded": recorded,
        "epsilon_pld_independent": independent,
    }
    if recorded is None or abs(float(recorded) - independent) > INSTITUTION_DP_TOLERANCE + 0.01 * independent:
        problems.append(
            f"institution-level ε recorded by the server ({recorded}) disagrees with dp-accounting PLD "
            f"({independent:.6g}) beyond {INSTITUTION_DP_TOLERANCE} + 1%"
        )
    return result


def _audit_institution(
    folder: Path,
    run_id: int | str | None,
    consortium: list[dict[str, Any]],
    stopped: dict[str, Any] | None,
    *,
    consortium_key: str | None,
    consortium_fingerprint: str | None,
    config: FedChurnConfig | None,
) -> InstitutionAudit:
    ledger = InstitutionLedger.in_folder(folder)
    audit = InstitutionAudit(name=folder.name, ledger=ledger.path, stopped=stopped)
    try:
        entries = ledger.entries()
    except LedgerError as exc:
        audit.tampering.append(str(exc))
        return audit
    audit.tampering = [str(p) for p in ledger.verify()]
    check_signatures(
        folder,
        entries,
        audit,
        consortium=consortium,
        consortium_key=consortium_key,
        consortium_fingerprint=consortium_fingerprint,
    )
    records = _records(entries, audit)
    every_run = list(records)
    if audit.tampering or not records:
        if not records and not audit.tampering:
            audit.findings.append("the ledger holds no records")
        return audit
    chosen = run_id if run_id is not None else records[-1].get("run_id")
    audit.run_id = chosen if isinstance(chosen, (int, str)) else None
    records = [r for r in records if r.get("run_id") == chosen]
    if not records:
        audit.findings.append(f"the ledger holds no record of run {chosen} (the run in summary.json)")
        return audit
    try:
        _recompose(records, audit)
    except FedChurnError as exc:  # a record whose numbers cannot be read or accounted
        audit.findings.append(str(exc))
        return audit
    _cross_check(folder, records, consortium, audit)
    check_what_ran(records, audit, config)
    lifetime_epsilon(every_run, audit)
    return audit


def _records(entries: Sequence[ChainEntry], audit: InstitutionAudit) -> list[dict[str, Any]]:
    records = []
    for entry in entries:
        try:
            records.append(entry.record)
        except (json.JSONDecodeError, LedgerError):
            continue  # already reported as tampering
    return records


def _recompose(records: list[dict[str, Any]], audit: InstitutionAudit) -> None:
    # Evaluation releases ("kind": "evaluate") are composed like any step; training settings come from training.
    trained = [r for r in records if r.get("kind", "train") == "train"]
    last = trained[-1] if trained else records[-1]
    accountants = {r.get("accountant") for r in records}
    deltas = {r.get("delta") for r in records}
    if len(accountants) != 1 or len(deltas) != 1:
        audit.findings.append(f"records of one run mix accountants {accountants} or deltas {deltas}")
    audit.accountant = str(last.get("accountant"))
    audit.delta = _float(last, "delta")
    audit.clipping_norm = _float(last, "clipping_norm")
    audit.dataset_size = int(last.get("dataset_size", 0))
    audit.max_epsilon = None if last.get("max_epsilon") is None else _float(last, "max_epsilon")
    audit.versions = dict(last.get("versions") or {})
    history: list[tuple[float, float, int]] = []
    cumulative = 0
    for record in records:
        sigma, q, steps = _float(record, "noise_multiplier"), _float(record, "sample_rate"), int(record["steps"])
        history.append((sigma, q, steps))
        cumulative += steps
        if record.get("cumulative_steps") != cumulative:
            audit.findings.append(
                f"record {record.get('seq')} (round {record.get('round')}): cumulative_steps "
                f"{record.get('cumulative_steps')} but the records before it add up to {cumulative}"
            )
        state = AccountantState(
            accountant=audit.accountant,
            history=tuple(MechanismStep(noise_multiplier=s, sample_rate=r, steps=n) for s, r, n in history),
        )
        recomposed = epsilon_of(state, delta=audit.delta)
        recorded = _float(record, "epsilon")
        audit.rounds.append(
            RoundRow(
                round=int(record.get("round", 0)),
                steps=steps,
                noise_multiplier=sigma,
                sample_rate=q,
                epsilon_recorded=recorded,
                epsilon_recomposed=recomposed,
            )
        )
        if not _close(recorded, recomposed, SAME_ACCOUNTANT_RTOL):
            audit.findings.append(
                f"record {record.get('seq')} (round {record.get('round')}): recorded ε {recorded:.6g} but "
                f"{audit.accountant.upper()} over the recorded history gives {recomposed:.6g}"
            )
    audit.epsilon = audit.rounds[-1].epsilon_recorded
    audit.epsilon_pld = pld_epsilon(history, delta=audit.delta)
    audit.epsilon_rdp_independent = rdp_epsilon(history, delta=audit.delta)
    epsilon = audit.epsilon
    if epsilon < audit.epsilon_pld - BELOW_PLD_TOLERANCE:
        audit.findings.append(
            f"final ε {epsilon:.6g} is below dp-accounting's PLD ε {audit.epsilon_pld:.6g} by more than "
            f"{BELOW_PLD_TOLERANCE}: the ledger under-reports the privacy spent"
        )
    ceiling = RDP_RATIO_LIMIT * audit.epsilon_rdp_independent + RDP_ABS_LIMIT
    if epsilon > ceiling:
        audit.findings.append(
            f"final ε {epsilon:.6g} is above {RDP_RATIO_LIMIT} × dp-accounting's RDP ε "
            f"({audit.epsilon_rdp_independent:.6g}) + {RDP_ABS_LIMIT}: not a plausible accounting of this history"
        )
    if audit.max_epsilon is not None and epsilon > audit.max_epsilon:
        audit.findings.append(f"final ε {epsilon:.6g} exceeds the institution's budget {audit.max_epsilon:g}")


def _cross_check(
    folder: Path, records: list[dict[str, Any]], consortium: list[dict[str, Any]], audit: InstitutionAudit
) -> None:
    state = _read_json(folder / STATE_FILE)
    if state is not None and state.get("run_id") == audit.run_id:
        history = (state.get("accountant_state") or {}).get("history") or []
        steps = sum(int(h.get("steps", 0)) for h in history if isinstance(h, dict))
        ledger_steps = sum(int(r["steps"]) for r in records)
        trained = [r for r in records if r.get("kind", "train") == "train"]
        if steps != ledger_steps or state.get("rounds_trained") != len(trained):
            audit.findings.append(
                f"the institution's state ({STATE_FILE}) has {state.get('rounds_trained')} rounds / {steps} steps "
                f"but the ledger {len(trained)} rounds / {ledger_steps} steps: records are missing from the ledger"
            )
    by_round = {int(r.get("round", -1)): r for r in records if r.get("kind", "train") == "train"}
    for reported in consortium:
        if reported.get("kind") != "train" or reported.get("institution") != audit.name:
            continue
        server_round = int(reported.get("round", -1))
        own = by_round.get(server_round)
        if own is None:
            audit.findings.append(
                f"the consortium holds a training report of round {server_round} that the ledger lacks: "
                "a record was removed"
            )
            continue
        told = reported.get("epsilon")
        if told is None or not _close(float(told), _float(own, "epsilon"), 1e-9):
            audit.findings.append(
                f"round {server_round}: the consortium was told ε {told} but the ledger records {own.get('epsilon')}"
            )


def add_empirical(
    audit: RunAudit,
    *,
    config_path: Path | None,
    institutions: Sequence[str] | None,
    canaries: int,
    beta: float,
) -> None:
    """Run the empirical one-run audit (clients/empirical_run.py) for the audited banks; record it beside ε.

    A lower bound above the ε the bank's accountant claims for the same canary run is a finding: the guarantee
    does not hold as implemented.
    """
    from fedchurn.clients.empirical_run import run_empirical_audit

    path = config_path or audit.run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        raise FedChurnError(f"--empirical needs the run's config: {path} does not exist (give it with --config FILE)")
    config = load_config(path)
    wanted = set(institutions or [i.name for i in audit.institutions])
    for inst in audit.institutions:
        if inst.name not in wanted:
            continue
        result = run_empirical_audit(config, inst.name, canaries=canaries, beta=beta)
        inst.empirical = result.to_dict()
        if result.epsilon_lower_bound > result.claimed_epsilon:
            inst.findings.append(
                f"empirical ε lower bound {result.epsilon_lower_bound:.4g} exceeds the claimed ε "
                f"{result.claimed_epsilon:.4g} at confidence {1 - beta:g}: the DP guarantee does not hold"
            )
