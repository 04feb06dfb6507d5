"""The bank's check of the server's instruction (the run-config) against its own policy, before it reads any row.

The policy itself, and where a bank's comes from, is ``shared/policy.py`` (the config schema embeds its section).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.policy import (
    POLICY_CLIPPING_TOO_HIGH,
    POLICY_DELTA_TOO_HIGH,
    POLICY_DP_REQUIRED,
    POLICY_MODE_NOT_ALLOWED,
    POLICY_NOISE_TOO_LOW,
    POLICY_REPRODUCIBLE_NOISE,
    POLICY_TOO_MANY_ROUNDS,
    BankPolicy,
)

__all__ = ["PolicyViolation", "check_instruction"]


@dataclass(frozen=True)
class PolicyViolation:
    """Which rule refused which value: ``code`` goes to the server, ``detail`` only to the bank's own log."""

    code: str
    detail: str


def check_instruction(policy: BankPolicy, config: FedChurnConfig, *, real_bank: bool) -> PolicyViolation | None:
    """The first rule of ``policy`` the instruction ``config`` breaks, or None. Looks at no data."""
    privacy = config.privacy
    if privacy.reproducible_noise and real_bank:
        return PolicyViolation(
            POLICY_REPRODUCIBLE_NOISE,
            "privacy.reproducible_noise = true asks for noise the server can regenerate; a real bank never does",
        )
    if policy.require_dp and not privacy.enabled:
        return PolicyViolation(POLICY_DP_REQUIRED, "privacy.enabled = false, but the policy requires DP (require_dp)")
    if config.transfer.mode not in policy.allowed_transfer_modes:
        return PolicyViolation(
            POLICY_MODE_NOT_ALLOWED,
            f"transfer.mode = {config.transfer.mode!r} is not in allowed_transfer_modes "
            f"{list(policy.allowed_transfer_modes)}",
        )
    if policy.max_rounds_per_run is not None and config.rounds > policy.max_rounds_per_run:
        return PolicyViolation(
            POLICY_TOO_MANY_ROUNDS,
            f"rounds = {config.rounds} is above max_rounds_per_run = {policy.max_rounds_per_run}",
        )
    if not privacy.enabled:
        return None
    if privacy.noise_multiplier is not None and privacy.noise_multiplier < policy.min_noise_multiplier:
        return PolicyViolation(
            POLICY_NOISE_TOO_LOW,
            f"privacy.noise_multiplier = {privacy.noise_multiplier:g} is below min_noise_multiplier = "
            f"{policy.min_noise_multiplier:g}",
        )
    if policy.max_clipping_norm is not None and privacy.clipping_norm > policy.max_clipping_norm:
        return PolicyViolation(
            POLICY_CLIPPING_TOO_HIGH,
            f"privacy.clipping_norm = {privacy.clipping_norm:g} is above max_clipping_norm = "
            f"{policy.max_clipping_norm:g}",
        )
    if policy.max_delta is not None and privacy.delta > policy.max_delta:
        return PolicyViolation(
            POLICY_DELTA_TOO_HIGH, f"privacy.delta = {privacy.delta:g} is above max_delta = {policy.max_delta:g}"
        )
    return None
