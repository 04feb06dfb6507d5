"""The bank's lifetime privacy budget, enforced before every round, and its ledger entry after every round.

A bank's ε is a lifetime figure: its ledger (``state_dir/ledger.sqlite``, on its own disk) holds every mechanism
it ever ran — training rounds and evaluation releases, of every run and run name — each with the fingerprint of
the rows it ran on (``clients/row_identity``). The ε it checks, plans with and reports is the composition of ALL
records with the current dataset's fingerprint; no run name, resume or config resets it.

Before training, the bank projects its lifetime ε after this round — that history plus exactly the steps this
round will take — and declines the round if it would exceed its cap: the bank policy's ``lifetime_epsilon``,
lowered (never raised) by the config's ``budget``. The projection is exact: the round then takes exactly those
steps at that σ and q, so a cap is never exceeded, not even by one round.
"""

from __future__ import annotations

import datetime
import logging
import math
from typing import Any

from fedchurn.clients.institution_identity import Institution
from fedchurn.shared.decline import BUDGET_EXHAUSTED, DP_DISABLED, Decline
from fedchurn.shared.errors import FedChurnError
from fedchurn.shared.ledger import InstitutionLedger, SignedHash
from fedchurn.shared.ledger_signing import (
    BANK_KEY_FILE,
    LedgerSigner,
    load_or_create_signer,
    load_signer,
    parse_countersignature,
)
from fedchurn.shared.privacy_accounting import AccountantState, MechanismStep, epsilon_of
from fedchurn.shared.provenance import library_versions
from fedchurn.shared.transfer import epochs_per_round

logger = logging.getLogger(__name__)

__all__ = [
    "BankDeclined",
    "BudgetDeclined",
    "bank_signer",
    "check_budget",
    "lifetime_cap",
    "lifetime_history",
    "record_round",
    "store_countersignature",
]


class BankDeclined(FedChurnError):
    """This bank declines the round; ``decline`` says why (a code from shared/decline.py, and numbers)."""

    def __init__(self, institution: str, server_round: int, decline: Decline, detail: str = "") -> None:
        self.institution = institution
        self.server_round = server_round
        self.decline = decline
        super().__init__(f"{institution} declines round {server_round}: {detail or decline.explain()}")


BudgetDeclined = BankDeclined  # the earlier name


def lifetime_cap(institution: Institution) -> float | None:
    """The most lifetime ε this bank spends: its policy's cap, lowered by the config's budget (None: no cap)."""
    caps = [
        cap
        for cap in (institution.policy.lifetime_epsilon, institution.config.budget.epsilon_for(institution.name))
        if cap is not None
    ]
    return min(caps) if caps else None


def lifetime_history(institution: Institution, *, fingerprint: str) -> AccountantState:
    """Every mechanism step in the bank's ledger on rows with this fingerprint, of any kind and any run.

    Records without a fingerprint (written before fingerprints existed) are counted too: an unknown dataset
    may be this one, and counting a step too many only overstates ε.
    """
    steps: list[MechanismStep] = []
    for entry in InstitutionLedger.in_folder(institution.state_dir).entries():
        record = entry.record
        if record.get("dataset_fingerprint", fingerprint) != fingerprint:
            continue
        if not all(key in record for key in ("noise_multiplier", "sample_rate", "steps")):
            continue  # not a mechanism (no numbers to compose)
        steps.append(
            MechanismStep(
                noise_multiplier=float(record["noise_multiplier"]),
                sample_rate=float(record["sample_rate"]),
                steps=int(record["steps"]),
            )
        )
    return AccountantState(accountant=institution.config.privacy.accountant, history=tuple(steps))


def check_budget(
    institution: Institution,
    lifetime: AccountantState,
    *,
    server_round: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    rounds_trained: int,
) -> None:
    """Raise :class:`BankDeclined` when ``steps`` more steps would take the lifetime ε past the bank's cap."""
    config = institution.config
    max_epsilon = lifetime_cap(institution)
    if max_epsilon is None:
        return
    privacy = config.privacy
    if not privacy.enabled:
        decline = Decline(
            reason=DP_DISABLED,
            epsilon=math.inf,
            projected_epsilon=math.inf,
            max_epsilon=max_epsilon,
            delta=0.0,
            rounds_trained=rounds_trained,
        )
        raise BankDeclined(institution.name, server_round, decline)
    spent = epsilon_of(lifetime, delta=privacy.delta)
    projected = epsilon_of(
        lifetime.with_steps(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps),
        delta=privacy.delta,
    )
    if projected <= max_epsilon:
        return
    decline = Decline(
        reason=BUDGET_EXHAUSTED,
        epsilon=spent,
        projected_epsilon=projected,
        max_epsilon=max_epsilon,
        delta=privacy.delta,
        rounds_trained=rounds_trained,
    )
    logger.warning("%s declines round %d: %s", institution.name, server_round, decline.explain())
    raise BankDeclined(institution.name, server_round, decline)


def record_round(
    institution: Institution,
    *,
    run_id: int | str,
    server_round: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    dataset_size: int,
    dataset_fingerprint: str,
    accountant: str,
    cumulative_steps: int,
    rounds_trained: int,
    epsilon: float,
) -> SignedHash:
    """Append this trained round to the bank's own ledger (``state_dir/ledger.sqlite``), signed by the bank.

    A round without DP is recorded too, with noise multiplier 0: its rows have no finite ε from then on (and an
    audit of the bank's folder flags it). ``epsilon`` is the bank's lifetime ε on these rows after this round;
    ``cumulative_steps`` and ``rounds_trained`` count this run's. Returns the bank's signature of the record's hash:
    it goes to the server in the reply (``ledger`` record), which countersigns it (shared/ledger_signing.py).
    """
    privacy = institution.config.privacy
    record: dict[str, Any] = {
        "kind": "train",
        "institution": institution.name,
        "run_id": run_id,
        "round": int(server_round),
        "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mechanism": "DP-SGD (Poisson-subsampled Gaussian)" if privacy.enabled else "SGD without DP",
        "unit": "one customer row (add/remove one row)",
        "noise_multiplier": float(noise_multiplier),
        "sample_rate": float(sample_rate),
        "steps": int(steps),
        "clipping_norm": float(privacy.clipping_norm),
        "delta": float(privacy.delta),
        "sampling": "poisson" if privacy.enabled else "shuffled batches",
        "noise_source": "seeded (reproducible_noise)" if privacy.reproducible_noise else "secret (OS CSPRNG)",
        "accountant": accountant,
        "dataset_size": int(dataset_size),
        "dataset_fingerprint": dataset_fingerprint,
        "cumulative_steps": int(cumulative_steps),
        "rounds_trained": int(rounds_trained),
        # what ran, so that an audit can recompute q = 1/ceil(n/B) and the steps from n
        "batch_size": int(institution.config.training.batch_size),
        "epochs_per_round": int(epochs_per_round(institution.config)),
        "epsilon": float(epsilon),
        "epsilon_scope": "lifetime: every ledger record on rows with this dataset_fingerprint",
        "max_epsilon": lifetime_cap(institution),
        "versions": library_versions(),
    }
    signer = bank_signer(institution)
    entry = InstitutionLedger.in_folder(institution.state_dir).append(record, sign=signer.sign)
    return signer.sign(entry.hash)  # ECDSA is randomised: an equally valid signature of the same hash


def bank_signer(institution: Institution) -> LedgerSigner:
    """The bank's ledger key: its SuperNode node key when given (node config ``ledger-key``), else its own."""
    if institution.ledger_key is not None:
        return load_signer(institution.ledger_key, "bank")
    return load_or_create_signer(institution.state_dir / BANK_KEY_FILE, "bank")


def store_countersignature(institution: Institution, text: Any) -> None:
    """Keep the consortium's countersignature (round config ``ledger-countersignature``) beside its record.

    The server's text is untrusted: it is verified and matched against this ledger's own hashes; anything else is
    logged at the bank and ignored (never raised: a hostile server must not be able to stop a bank this way).
    """
    parsed = parse_countersignature(text)
    if isinstance(parsed, str):
        logger.warning("%s: ignoring a ledger countersignature: %s", institution.name, parsed)
        return
    try:
        reason = InstitutionLedger.in_folder(institution.state_dir).add_countersignature(parsed)
    except FedChurnError as exc:
        logger.warning("%s: cannot store a ledger countersignature: %s", institution.name, exc)
        return
    if reason is not None:
        logger.warning("%s: ignoring a ledger countersignature: %s", institution.name, reason)
