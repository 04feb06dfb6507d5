"""The institution's privacy budget, enforced before every round, and its ledger entry after every round.

Before training, the institution projects its ε after this round — its whole history plus exactly the steps
this round will take, composed by its own accountant (``shared/privacy``) — and declines the round if that
would exceed its budget (``budget`` in the config). The projection is exact, not an estimate: the round then
takes exactly those steps at that σ and q, so the ε reported afterwards equals the projection and a budget is
never exceeded, not even by one round.
"""

from __future__ import annotations

import datetime
import logging
import math
from typing import TYPE_CHECKING, Any

from clients.state import InstitutionState
from shared.decline import BUDGET_EXHAUSTED, DP_DISABLED, Decline
from shared.errors import FedChurnError
from shared.ledger import InstitutionLedger, SignedHash
from shared.ledger_signing import (
    BANK_KEY_FILE,
    LedgerSigner,
    load_or_create_signer,
    load_signer,
    parse_countersignature,
)
from shared.privacy import epsilon_of
from shared.provenance import library_versions
from shared.transfer import epochs_per_round

if TYPE_CHECKING:  # clients.institution calls into this module
    from clients.institution import Institution

logger = logging.getLogger(__name__)

__all__ = ["BudgetDeclined", "bank_signer", "check_budget", "record_round", "store_countersignature"]


class BudgetDeclined(FedChurnError):
    """This institution declines the round; ``decline`` says why, with the numbers."""

    def __init__(self, institution: str, server_round: int, decline: Decline) -> None:
        self.institution = institution
        self.server_round = server_round
        self.decline = decline
        super().__init__(f"{institution} declines round {server_round}: {decline.explain()}")


def check_budget(
    institution: Institution,
    state: InstitutionState,
    *,
    server_round: int,
    sample_rate: float,
    steps: int,
) -> None:
    """Raise :class:`BudgetDeclined` when training ``steps`` more steps would exceed the institution's budget."""
    config = institution.config
    max_epsilon = config.budget.epsilon_for(institution.name)
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
            rounds_trained=state.rounds_trained,
        )
        raise BudgetDeclined(institution.name, server_round, decline)
    sigma = state.noise_multiplier if state.noise_multiplier is not None else 0.0
    spent = epsilon_of(state.accountant, delta=privacy.delta)
    projected = epsilon_of(
        state.accountant.with_steps(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps),
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
        rounds_trained=state.rounds_trained,
    )
    logger.warning("%s declines round %d: %s", institution.name, server_round, decline.explain())
    raise BudgetDeclined(institution.name, server_round, decline)


def record_round(
    institution: Institution,
    state: InstitutionState,
    *,
    run_id: int | str,
    server_round: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    dataset_size: int,
    epsilon: float,
) -> SignedHash | None:
    """Append this trained round to the institution's own ledger (``state_dir/ledger.sqlite``), signed by the bank.

    Returns the bank's signature of the record's hash: it goes to the server in the reply (``ledger`` record), which
    countersigns it (shared/ledger_signing.py); None when nothing was recorded.
    """
    privacy = institution.config.privacy
    if not privacy.enabled:
        return None  # no DP, no guarantee to account for
    record: dict[str, Any] = {
        "kind": "train",
        "institution": institution.name,
        "run_id": run_id,
        "round": int(server_round),
        "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mechanism": "DP-SGD (Poisson-subsampled Gaussian)",
        "unit": "one customer row (add/remove one row)",
        "noise_multiplier": float(noise_multiplier),
        "sample_rate": float(sample_rate),
        "steps": int(steps),
        "clipping_norm": float(privacy.clipping_norm),
        "delta": float(privacy.delta),
        "sampling": "poisson",
        "accountant": state.accountant.accountant,
        "dataset_size": int(dataset_size),
        # what ran, so that an audit can recompute q = 1/ceil(n/B) and the steps from n
        "batch_size": int(institution.config.training.batch_size),
        "epochs_per_round": int(epochs_per_round(institution.config)),
        "cumulative_steps": state.accountant.total_steps,
        "rounds_trained": state.rounds_trained,
        "epsilon": float(epsilon),
        "max_epsilon": institution.config.budget.epsilon_for(institution.name),
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
