"""What an audit finds: each institution's result, the run's, and the tolerances the checks apply.

Filled in by ``fedchurn/auditing/run_audit.py`` and ``fedchurn/auditing/evidence.py``; rendered by
``fedchurn/auditing/bank_page.py`` and ``fedchurn audit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BELOW_PLD_TOLERANCE",
    "INSTITUTION_DP_TOLERANCE",
    "RDP_ABS_LIMIT",
    "RDP_RATIO_LIMIT",
    "SAME_ACCOUNTANT_RTOL",
    "InstitutionAudit",
    "RoundRow",
    "RunAudit",
]

SAME_ACCOUNTANT_RTOL = 1e-6
BELOW_PLD_TOLERANCE = 0.02  # PLD's pessimistic discretisation error (~1e-3) with margin; Opacus PRV sits ~0.01 above
RDP_RATIO_LIMIT = 1.05  # Opacus' and dp-accounting's RDP order grids differ by well under 1%
RDP_ABS_LIMIT = 0.05
INSTITUTION_DP_TOLERANCE = 0.02  # exact GDP (server) vs pessimistic PLD (audit)


@dataclass
class RoundRow:
    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    epsilon_recorded: float
    epsilon_recomposed: float


@dataclass
class InstitutionAudit:
    name: str
    ledger: Path
    run_id: int | str | None = None
    tampering: list[str] = field(default_factory=list)  # chain breaks, each naming the record
    findings: list[str] = field(default_factory=list)  # disagreements: ε, budget, cross-checks
    rounds: list[RoundRow] = field(default_factory=list)
    accountant: str | None = None
    delta: float | None = None
    clipping_norm: float | None = None
    dataset_size: int | None = None
    max_epsilon: float | None = None
    epsilon: float | None = None  # the final recorded cumulative ε
    epsilon_pld: float | None = None
    epsilon_rdp_independent: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    stopped: dict[str, Any] | None = None  # the consortium's record of its first decline
    notes: list[str] = field(default_factory=list)  # what could not be checked, and why (not failures)
    signatures: dict[str, Any] = field(default_factory=dict)  # counts and key fingerprints (audit_evidence)
    lifetime_epsilon: float | None = None  # over every run in the ledger on the same rows
    lifetime_runs: int = 0
    empirical: dict[str, Any] | None = None  # `fedchurn audit --empirical` (fedchurn/auditing/empirical.py)

    @property
    def passed(self) -> bool:
        return not self.tampering and not self.findings

    @property
    def budget_remaining(self) -> float | None:
        if self.max_epsilon is None or self.epsilon is None:
            return None
        return self.max_epsilon - self.epsilon

    def to_dict(self) -> dict[str, Any]:
        return {
            "institution": self.name,
            "passed": self.passed,
            "run_id": self.run_id,
            "tampering": self.tampering,
            "findings": self.findings,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "epsilon_pld_independent": self.epsilon_pld,
            "epsilon_rdp_independent": self.epsilon_rdp_independent,
            "max_epsilon": self.max_epsilon,
            "budget_remaining": self.budget_remaining,
            "rounds": [r.__dict__ for r in self.rounds],
            "stopped": self.stopped,
            "notes": self.notes,
            "signatures": self.signatures,
            "lifetime_epsilon": self.lifetime_epsilon,
            "lifetime_runs": self.lifetime_runs,
            "empirical": self.empirical,
        }


@dataclass
class RunAudit:
    run_dir: Path
    run_id: int | str | None
    institutions: list[InstitutionAudit]
    consortium_problems: list[str] = field(default_factory=list)
    institution_dp: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return not self.consortium_problems and all(i.passed for i in self.institutions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "run_id": self.run_id,
            "passed": self.passed,
            "tolerances": {
                "same_accountant_rtol": SAME_ACCOUNTANT_RTOL,
                "below_pld_abs": BELOW_PLD_TOLERANCE,
                "above_rdp": f"{RDP_RATIO_LIMIT} x eps_rdp + {RDP_ABS_LIMIT}",
            },
            "consortium_problems": self.consortium_problems,
            "institution_dp": self.institution_dp,
            "institutions": [i.to_dict() for i in self.institutions],
        }
