"""The audit's evidence checks beyond the hash chain: signatures, cross-anchors, and the records against what ran.

A consistent hash chain proves nothing against the party that owns it (it can re-chain after an edit). What makes
a rewrite by one party fail is a signature by the *other* party over the original record hash:

- every record of a bank's ledger must carry the bank's own signature of its hash (one key throughout; the key
  file in the bank's folder, when there, must be that key);
- every record must be anchored by the consortium's countersignature of its own hash or of a later record's (whose
  hash chains it): evaluation releases never travel, and a round interrupted between train and evaluate never gets
  its countersignature back; records after the last countersigned one wait for one, and among them at most one
  training record (the newest round's): more means countersignatures were removed. Each
  countersignature must be by the consortium key the bank pinned at its first countersignature;
  that key must be the consortium's real key: the server's key file or consortium ledger when the run folder is
  audited, or the fingerprint the consortium publishes (``--consortium-key``) when a bank's folder is audited alone;
- the consortium ledger's copy of each bank-signed hash must be the bank ledger's hash of that round.

And the records must agree with what ran: DP-SGD with Poisson sampling and σ > 0 in every round (no round without
DP), q = 1/ceil(n/B) for the recorded training-set size n and batch size B, steps = epochs × ceil(n/B), the
config the run was started with (when its folder has one), and the lifetime ε over every run on the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedchurn.auditing.findings import InstitutionAudit
from fedchurn.shared.ledger import ChainEntry, InstitutionLedger, LedgerError
from fedchurn.shared.ledger_signing import (
    BANK_KEY_FILE,
    CONSORTIUM_KEY_FILE,
    SigningError,
    fingerprint,
    load_signer,
    verify,
)
from fedchurn.shared.privacy_accounting import AccountantState, MechanismStep, epsilon_of

if TYPE_CHECKING:
    from fedchurn.shared.config import FedChurnConfig

__all__ = ["check_signatures", "check_what_ran", "consortium_public_key", "lifetime_epsilon"]

MECHANISM = "DP-SGD (Poisson-subsampled Gaussian)"
Q_RTOL = 1e-12


def consortium_public_key(run_dir: Path, consortium: Sequence[dict[str, Any]]) -> str | None:
    """The consortium's real ledger key, from the server's key file or, failing that, its own ledger."""
    path = run_dir / CONSORTIUM_KEY_FILE
    if path.is_file():
        try:
            return load_signer(path, "consortium").public_key
        except SigningError:
            return None
    for record in consortium:
        signed = record.get("consortium_countersignature")
        if isinstance(signed, dict) and isinstance(signed.get("public-key"), str):
            return str(signed["public-key"])
    return None


def check_signatures(
    folder: Path,
    entries: Sequence[ChainEntry],
    audit: InstitutionAudit,
    *,
    consortium: Sequence[dict[str, Any]],
    consortium_key: str | None,
    consortium_fingerprint: str | None,
) -> None:
    """Signatures and cross-anchors of one bank ledger; problems go to ``audit.tampering`` (see module doc)."""
    ledger = InstitutionLedger.in_folder(folder)
    try:
        signatures, countersignatures = ledger.signatures(), ledger.countersignatures()
        pinned = ledger.pinned_consortium_key()
    except LedgerError as exc:
        audit.tampering.append(str(exc))
        return
    problems = audit.tampering
    bank_keys = {s.public_key for s in signatures.values()}
    own_key = None
    if (folder / BANK_KEY_FILE).is_file():
        try:
            own_key = load_signer(folder / BANK_KEY_FILE, "bank").public_key
        except SigningError:
            problems.append(f"the bank's key file {BANK_KEY_FILE} cannot be read")
    if len(bank_keys) > 1:
        problems.append(f"the bank's records are signed with {len(bank_keys)} different keys")
    if own_key is not None and bank_keys - {own_key}:
        problems.append("records are signed with a key other than the bank's own key file")
    # A record is anchored by its own countersignature or by any later countersigned one (its hash is chained into
    # every later record's): rewriting it would break that countersignature. Only records after the last
    # countersigned one can still be rewritten unseen; they wait for the server's next message.
    last_countersigned = max((seq for seq in countersignatures), default=0)
    pending = []
    for entry in entries:
        signed = signatures.get(entry.seq)
        if signed is None:
            problems.append(f"record {entry.seq}: not signed by the bank")
        elif signed.record_hash != entry.hash or not verify(signed, "bank"):
            problems.append(f"record {entry.seq}: the bank's signature does not cover this record: it was rewritten")
        counter = countersignatures.get(entry.seq)
        if counter is None:
            # Evaluation releases never travel to the server, and a round interrupted between its train and
            # evaluate phases never got its countersignature back: both are anchored by a later one.
            if entry.seq > last_countersigned:
                pending.append(entry.seq)
        elif counter.record_hash != entry.hash:
            problems.append(
                f"record {entry.seq}: the consortium countersigned a different record: it was rewritten after the "
                "consortium received it"
            )
        elif not verify(counter, "consortium") or counter.public_key != pinned:
            problems.append(f"record {entry.seq}: the consortium's countersignature does not verify")
    unanchored = [entry.seq for entry in entries if entry.seq in pending and _kind(entry) == "train"]
    if len(unanchored) > 1:  # only the newest round's record may still wait for its countersignature
        problems.append(
            f"records {unanchored}: {len(unanchored)} training records are anchored by no countersignature, neither "
            "their own nor a later record's: countersignatures were removed, or the consortium never received them"
        )
    expected = consortium_key
    if pinned is not None and expected is not None and pinned != expected:
        problems.append(
            "the consortium key pinned in the bank's ledger is not the consortium's key: countersignatures were "
            "made by someone else"
        )
    if pinned is not None and consortium_fingerprint is not None and fingerprint(pinned) != consortium_fingerprint:
        problems.append("the consortium key pinned in the bank's ledger does not have the published fingerprint")
    if pinned is not None and expected is None and consortium_fingerprint is None:
        audit.notes.append(
            f"the consortium key pinned in the ledger (fingerprint {fingerprint(pinned)}) was not compared with the "
            "consortium's published one: pass --consortium-key FINGERPRINT"
        )
    _cross_anchor(entries, audit, consortium)
    audit.signatures = {
        "signed": sum(1 for e in entries if e.seq in signatures),
        "countersigned": sum(1 for e in entries if e.seq in countersignatures),
        "records": len(entries),
        "training_records": sum(1 for e in entries if _kind(e) == "train"),
        "pending_countersignature": pending,
        "bank_key_fingerprint": fingerprint(next(iter(bank_keys))) if len(bank_keys) == 1 else None,
        "consortium_key_fingerprint": fingerprint(pinned) if pinned else None,
        "consortium_key_checked_against": "the consortium's key file / ledger"
        if expected is not None
        else ("the published fingerprint" if consortium_fingerprint else None),
    }


def _kind(entry: ChainEntry) -> str:
    try:
        return str(entry.record.get("kind", "train"))
    except LedgerError:
        return "train"


def _cross_anchor(entries: Sequence[ChainEntry], audit: InstitutionAudit, consortium: Sequence[dict[str, Any]]) -> None:
    """The consortium's copy of each bank-signed hash must be this ledger's hash of that run and round."""
    by_round: dict[tuple[Any, int], str] = {}
    for entry in entries:
        try:
            record = entry.record
        except LedgerError:
            continue
        if record.get("kind", "train") != "train":
            continue  # evaluation releases are signed by the bank but not reported in a train reply
        by_round[(record.get("run_id"), int(record.get("round", -1)))] = entry.hash
    for reported in consortium:
        if reported.get("kind") != "train" or reported.get("institution") != audit.name:
            continue
        bank = reported.get("bank_ledger")
        if not isinstance(bank, dict):
            continue
        key = (reported.get("run_id"), int(reported.get("round", -1)))
        if by_round.get(key) is not None and bank.get("record-hash") != by_round[key]:
            audit.tampering.append(
                f"round {key[1]}: the consortium holds the bank's signature of a different record than the ledger's: "
                "one of the two ledgers was rewritten"
            )


def check_what_ran(records: Sequence[dict[str, Any]], audit: InstitutionAudit, config: FedChurnConfig | None) -> None:
    """Each record against the mechanism, q and steps that its own n and B (and the run's config) imply."""
    for record in records:
        where = f"record {record.get('seq')} (round {record.get('round')})"
        sigma = record.get("noise_multiplier")
        if record.get("kind") == "evaluate":
            _check_release(record, where, audit)
            continue
        if record.get("mechanism") != MECHANISM or record.get("sampling") != "poisson":
            audit.findings.append(f"{where}: mechanism {record.get('mechanism')!r} is not {MECHANISM}")
        if not isinstance(sigma, (int, float)) or not sigma > 0:
            audit.findings.append(f"{where}: trained without DP noise (σ = {sigma!r})")
        n, batch, epochs = record.get("dataset_size"), record.get("batch_size"), record.get("epochs_per_round")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (n, batch, epochs)):
            audit.notes.append(f"{where}: no dataset size / batch size / epochs recorded: q and steps not re-derived")
            continue
        batches = math.ceil(n / batch)  # type: ignore[operator]  # what a Poisson loader over n rows runs per epoch
        q, steps = 1.0 / batches, epochs * batches  # type: ignore[operator]
        if not math.isclose(float(record.get("sample_rate", -1.0)), q, rel_tol=Q_RTOL):
            audit.findings.append(f"{where}: q = {record.get('sample_rate')} but 1/ceil({n}/{batch}) = {q:.10g}")
        if record.get("steps") != steps:
            audit.findings.append(f"{where}: {record.get('steps')} steps but {epochs} × ceil({n}/{batch}) = {steps}")
        if config is not None:
            ran = {
                "batch_size": config.training.batch_size,
                "clipping_norm": config.privacy.clipping_norm,
                "delta": config.privacy.delta,
                "accountant": config.privacy.accountant,
            }
            for key, value in ran.items():
                if record.get(key) != value:
                    audit.findings.append(f"{where}: {key} {record.get(key)!r} but the run's config says {value!r}")
            if config.privacy.noise_multiplier is not None and sigma != config.privacy.noise_multiplier:
                audit.findings.append(
                    f"{where}: σ {sigma!r} but the run's config says {config.privacy.noise_multiplier!r}"
                )


def _check_release(record: dict[str, Any], where: str, audit: InstitutionAudit) -> None:
    """An evaluation release: one Gaussian mechanism (sensitivity 1) over the whole of its rows."""
    sigma = record.get("noise_multiplier")
    if not str(record.get("mechanism", "")).startswith("Gaussian"):
        audit.findings.append(f"{where}: evaluation release mechanism {record.get('mechanism')!r} is not Gaussian")
    if not isinstance(sigma, (int, float)) or not sigma > 0:
        audit.findings.append(f"{where}: evaluation released without noise (σ = {sigma!r})")
    if record.get("sample_rate") != 1.0 or record.get("steps") != 1 or record.get("sensitivity", 1.0) != 1.0:
        audit.findings.append(
            f"{where}: an evaluation release is one step at sample rate 1 and sensitivity 1, recorded "
            f"q = {record.get('sample_rate')!r}, steps = {record.get('steps')!r}"
        )


def lifetime_epsilon(records: Sequence[dict[str, Any]], audit: InstitutionAudit) -> None:
    """ε composed over EVERY record in the ledger with the same rows (every run, every run name).

    Rows are identified by the record's ``dataset_fingerprint`` when it has one, else by the recorded training-set
    size (a weaker proxy, said so in the notes). Uses the accountant and δ of the audited run.
    """
    if audit.accountant is None or audit.delta is None or not records:
        return
    current = records[-1]
    fingerprint_key = "dataset_fingerprint" if current.get("dataset_fingerprint") else "dataset_size"
    if fingerprint_key == "dataset_size":
        audit.notes.append("records carry no dataset fingerprint: lifetime ε groups runs by training-set size")
    same = [r for r in records if r.get(fingerprint_key) == current.get(fingerprint_key)]
    try:
        history = tuple(
            MechanismStep(
                noise_multiplier=float(r["noise_multiplier"]),
                sample_rate=float(r["sample_rate"]),
                steps=int(r["steps"]),
            )
            for r in same
        )
        audit.lifetime_epsilon = epsilon_of(
            AccountantState(accountant=audit.accountant, history=history), delta=audit.delta
        )
    except (KeyError, TypeError, ValueError) as exc:
        audit.findings.append(f"lifetime ε cannot be composed from the ledger: {exc}")
        return
    audit.lifetime_runs = len({str(r.get("run_id")) for r in same})
    if audit.max_epsilon is not None and audit.lifetime_epsilon > audit.max_epsilon * (1 + 1e-9):
        audit.findings.append(
            f"lifetime ε {audit.lifetime_epsilon:.6g} over {audit.lifetime_runs} run(s) on the same rows exceeds the "
            f"budget {audit.max_epsilon:g}"
        )
