"""`fedchurn simulate --dry-run`: what each institution would do, without training.

Per institution: its rows (train/validation/test), expected batch and Poisson sample rate, DP-SGD steps per
round, the noise multiplier σ and the ε projected after every planned round and evaluation release.

The numbers come from the functions a bank's own round uses (clients/institution.py): the sample rate and steps
from its training rows n, σ from n, the target and its ledger (``noise_multiplier_after``), its policy's floor,
and ε composed with the run's accountant. As at the bank, σ is planned from n and public settings alone, never
from a row. Row counts are those of a split keyed by the config's seed: each bank splits with its own secret key,
row by row, so its counts (and so its ε) differ a little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fedchurn.clients.budget import lifetime_cap, lifetime_history
from fedchurn.clients.institution_identity import Institution
from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.private_metrics import evaluation_settings
from fedchurn.clients.splits import UnbalancedSplitError
from fedchurn.clients.training import steps_per_round
from fedchurn.progress import report_stage
from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.errors import PrivacyError
from fedchurn.shared.ledger import LEDGER_FILE
from fedchurn.shared.policy import policy_for_simulated_bank
from fedchurn.shared.privacy_accounting import AccountantState, epsilon_of, noise_multiplier_after, sample_rate_for
from fedchurn.shared.transfer import epochs_per_round

__all__ = ["BankPlan", "plan_banks"]


@dataclass(frozen=True)
class BankPlan:
    name: str
    n_train: int
    n_val: int
    n_test: int
    batch_size: int  # expected batch size
    sample_rate: float  # Poisson sample rate q
    steps_per_round: int
    noise_multiplier: float | None  # None: DP off, or no σ can keep the target
    projected_epsilon: float | None  # lifetime ε after every planned round and release; None: DP off
    spent_epsilon: float = 0.0  # lifetime ε already in the bank's ledger on these rows
    evaluation_releases: int = 0
    note: str = ""  # why a bank would decline, or what the plan assumes


def plan_banks(config: FedChurnConfig, institutions: tuple[str, ...]) -> list[BankPlan]:
    """The plan of every institution of a simulation whose ``config.output_dir`` is already resolved."""
    plans = []
    for index, name in enumerate(institutions, start=1):
        report_stage("planning %s (%d/%d): its rows, steps, σ and projected ε", name, index, len(institutions))
        plans.append(_plan_bank(config, name))
    return plans


def _plan_bank(config: FedChurnConfig, name: str) -> BankPlan:
    state_dir = Path(config.output_dir) / "institutions" / name
    institution = Institution(
        name=name, config=config, state_dir=state_dir, policy=policy_for_simulated_bank(config.policy, name)
    )
    note = ""
    try:
        data = prepare_institution(config, name)
    except UnbalancedSplitError as exc:
        return BankPlan(name, 0, 0, 0, 0, 0.0, 0, None, None, note=f"cannot split: {exc}")
    n_train = len(data.y_train)
    batch = config.training.batch_size
    sample_rate = sample_rate_for(dataset_size=n_train, batch_size=batch)
    steps = steps_per_round(n_train=n_train, batch_size=batch, local_epochs=epochs_per_round(config))
    sizes = (n_train, len(data.y_val), len(data.y_test))
    privacy = config.privacy
    if not privacy.enabled:
        return BankPlan(name, *sizes, batch, sample_rate, steps, None, None, note="DP off: no guarantee")
    lifetime = AccountantState(accountant=privacy.accountant)
    if (state_dir / LEDGER_FILE).is_file():  # an earlier run on these rows (--overwrite, resume) counts
        lifetime = lifetime_history(institution, fingerprint=data.fingerprint)
    spent = epsilon_of(lifetime, delta=privacy.delta)
    evaluation = evaluation_settings(config, policy=institution.policy)
    releases = evaluation.planned_releases(config.rounds)
    planned = lifetime
    if releases:
        planned = lifetime.with_steps(noise_multiplier=evaluation.noise_multiplier, sample_rate=1.0, steps=releases)
    if privacy.noise_multiplier is not None:
        sigma = float(privacy.noise_multiplier)
    else:
        target = math.inf if privacy.target_epsilon is None else float(privacy.target_epsilon)  # schema: set
        cap = lifetime_cap(institution)
        if cap is not None:
            target = min(target, cap)
        try:
            sigma = noise_multiplier_after(
                planned,
                target_epsilon=target,
                delta=privacy.delta,
                sample_rate=sample_rate,
                steps=config.rounds * steps,
            )
        except PrivacyError as exc:
            return BankPlan(
                name, *sizes, batch, sample_rate, steps, None, None, spent, releases, note=f"would decline: {exc}"
            )
        if sigma < institution.policy.min_noise_multiplier:
            sigma = institution.policy.min_noise_multiplier
            note = "σ raised to the policy's minimum"
    final = planned.with_steps(noise_multiplier=sigma, sample_rate=sample_rate, steps=config.rounds * steps)
    projected = epsilon_of(final, delta=privacy.delta)
    cap = lifetime_cap(institution)
    if cap is not None and projected > cap:
        note = f"stops at its budget ε {cap:g} before the last round"
    return BankPlan(name, *sizes, batch, sample_rate, steps, sigma, projected, spent, releases, note=note)
