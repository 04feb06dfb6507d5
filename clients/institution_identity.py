"""Which bank a ClientApp serves: its name, the run's config as it sees it, its state folder, policy and ledger key.

Its own module so that the round (clients/institution.py), the budget (clients/budget.py) and the private
evaluation (clients/private_evaluation.py) all read it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.policy import CONSERVATIVE_POLICY, BankPolicy

__all__ = ["Institution"]


@dataclass(frozen=True)
class Institution:
    name: str
    config: FedChurnConfig  # the run's config, with the data section as this institution sees it
    state_dir: Path
    real_bank: bool = False  # a real SuperNode (node config names the institution), not a simulated one
    policy: BankPolicy = CONSERVATIVE_POLICY  # the bank's own rules (shared/policy.py)
    ledger_key: Path | None = None  # None: a key generated once in state_dir (shared/ledger_signing.py)
