"""The bank's own privacy policy: what it will and will not do, whatever the server asks.

The server writes the run-config every bank receives; a bank's customers need protection from exactly that
party. So before a bank touches its data it checks the instruction (the run-config) against its policy
(``clients/policy_check.py``), and declines with a reason code from a fixed list (``shared/decline.py``) when any
rule is broken. Its own log says which rule refused which value; the server only learns the code.

Where a bank's policy comes from:

- A real bank (its SuperNode's node config names its ``institution``): the YAML file named by the node config's
  ``policy`` key, e.g. ``--node-config "... policy='/etc/bank/privacy-policy.yaml'"``. Keys missing from the file
  take the values of :data:`CONSERVATIVE_POLICY`; without a file at all the bank uses :data:`CONSERVATIVE_POLICY`
  and logs that it does. The run-config's ``policy`` section is ignored: the server wrote it.
- A simulated bank: the run-config's ``policy`` section (shared by every virtual bank) with that bank's entry in
  ``policy.institutions`` over it. The same check runs on it, by the same code. (In a simulation the one who writes
  the config plays every bank as well as the server, so its defaults constrain nothing.)

Stdlib only (and shared.errors): the config schema (``shared/config.py``) embeds :class:`PolicyConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedchurn.shared.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CONSERVATIVE_POLICY",
    "BankPolicy",
    "PolicyConfig",
    "PolicyOverride",
    "load_policy",
    "policy_for_simulated_bank",
]

TRANSFER_MODES = ("finetune", "frozen", "fedrep", "fedavg", "local", "centralized")

# Reason codes of a policy decline (shared/decline.py lists them with the others).
POLICY_DP_REQUIRED = "policy-dp-required"
POLICY_NOISE_TOO_LOW = "policy-noise-too-low"
POLICY_CLIPPING_TOO_HIGH = "policy-clipping-too-high"
POLICY_DELTA_TOO_HIGH = "policy-delta-too-high"
POLICY_MODE_NOT_ALLOWED = "policy-mode-not-allowed"
POLICY_TOO_MANY_ROUNDS = "policy-too-many-rounds"
POLICY_REPRODUCIBLE_NOISE = "policy-reproducible-noise"
POLICY_CODES = (
    POLICY_DP_REQUIRED,
    POLICY_NOISE_TOO_LOW,
    POLICY_CLIPPING_TOO_HIGH,
    POLICY_DELTA_TOO_HIGH,
    POLICY_MODE_NOT_ALLOWED,
    POLICY_TOO_MANY_ROUNDS,
    POLICY_REPRODUCIBLE_NOISE,
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(key, value, rule)


@dataclass(frozen=True)
class BankPolicy:
    """One bank's rules. ``None`` for a limit means: no limit of the bank's own (the config's still applies)."""

    require_dp: bool = False  # refuse any round with privacy.enabled = false
    min_noise_multiplier: float = 0.0  # refuse an explicit σ below this (a planned σ is raised to it)
    max_clipping_norm: float | None = None  # refuse a larger per-row clipping norm C
    max_delta: float | None = None  # refuse a larger δ
    lifetime_epsilon: float | None = None  # cap on ε over every round ever run on these rows (the config can lower it)
    allowed_transfer_modes: tuple[str, ...] = TRANSFER_MODES
    evaluation: Literal["off", "dp"] = "dp"  # what the evaluation path may release: nothing, or DP statistics
    evaluation_noise_multiplier: float = 5.0  # σ of the Gaussian noise on each released evaluation count
    max_rounds_per_run: int | None = None  # refuse to train more rounds than this in one run
    report_dataset_size: bool = False  # send exact row counts (FedAvg weight, n-train/n-test); else 1.0 / none

    def __post_init__(self) -> None:
        prefix = "policy"
        _check(isinstance(self.require_dp, bool), f"{prefix}.require_dp", self.require_dp, "must be true or false")
        _check(
            _is_number(self.min_noise_multiplier) and self.min_noise_multiplier >= 0.0,
            f"{prefix}.min_noise_multiplier",
            self.min_noise_multiplier,
            "must be a number >= 0",
        )
        for key in ("max_clipping_norm", "lifetime_epsilon"):
            value = getattr(self, key)
            _check(value is None or (_is_number(value) and value > 0), f"{prefix}.{key}", value, "must be > 0 or null")
        _check(
            self.max_delta is None or (_is_number(self.max_delta) and 0.0 < self.max_delta < 1.0),
            f"{prefix}.max_delta",
            self.max_delta,
            "must be in (0, 1) or null",
        )
        modes = self.allowed_transfer_modes
        if isinstance(modes, list):
            object.__setattr__(self, "allowed_transfer_modes", tuple(modes))
            modes = self.allowed_transfer_modes
        _check(
            isinstance(modes, tuple) and all(m in TRANSFER_MODES for m in modes),
            f"{prefix}.allowed_transfer_modes",
            modes,
            f"must be a list of {', '.join(TRANSFER_MODES)}",
        )
        _check(self.evaluation in ("off", "dp"), f"{prefix}.evaluation", self.evaluation, "must be 'off' or 'dp'")
        _check(
            _is_number(self.evaluation_noise_multiplier) and self.evaluation_noise_multiplier > 0,
            f"{prefix}.evaluation_noise_multiplier",
            self.evaluation_noise_multiplier,
            "must be a number > 0",
        )
        _check(
            self.max_rounds_per_run is None
            or (
                (isinstance(self.max_rounds_per_run, int) and not isinstance(self.max_rounds_per_run, bool))
                and self.max_rounds_per_run >= 1
            ),
            f"{prefix}.max_rounds_per_run",
            self.max_rounds_per_run,
            "must be a whole number >= 1 or null",
        )
        _check(
            isinstance(self.report_dataset_size, bool),
            f"{prefix}.report_dataset_size",
            self.report_dataset_size,
            "must be true or false",
        )


# What a real bank enforces when its node config names no policy file, and what a policy file's missing keys mean.
CONSERVATIVE_POLICY = BankPolicy(
    require_dp=True,
    min_noise_multiplier=0.8,
    max_clipping_norm=10.0,
    max_delta=1.0e-5,
    lifetime_epsilon=10.0,
    allowed_transfer_modes=("finetune", "frozen", "fedrep"),  # never the head's weights (fedavg)
    evaluation="dp",  # DP statistics only, each release accounted in the same lifetime ε under the same cap
    evaluation_noise_multiplier=5.0,
    max_rounds_per_run=200,
    report_dataset_size=False,
)


@dataclass(frozen=True)
class PolicyOverride:
    """One simulated bank's entries over the section's defaults (null: take the default)."""

    require_dp: bool | None = None
    min_noise_multiplier: float | None = None
    max_clipping_norm: float | None = None
    max_delta: float | None = None
    lifetime_epsilon: float | None = None
    allowed_transfer_modes: tuple[str, ...] | None = None
    evaluation: Literal["off", "dp"] | None = None
    evaluation_noise_multiplier: float | None = None
    max_rounds_per_run: int | None = None
    report_dataset_size: bool | None = None


@dataclass(frozen=True)
class PolicyConfig(BankPolicy):
    """The run-config's ``policy`` section: every simulated bank's policy, with per-bank overrides."""

    institutions: dict[str, PolicyOverride] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.institutions:
            policy_for_simulated_bank(self, name)  # every override must make a valid policy


def _policy_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(BankPolicy))


def policy_for_simulated_bank(section: PolicyConfig, institution: str) -> BankPolicy:
    """The section's defaults with ``institution``'s overrides over them."""
    values = {name: getattr(section, name) for name in _policy_fields()}
    override = section.institutions.get(institution)
    if override is not None:
        values.update({k: v for k, v in dataclasses.asdict(override).items() if v is not None})
        if override.allowed_transfer_modes is not None:
            values["allowed_transfer_modes"] = tuple(override.allowed_transfer_modes)
    try:
        return BankPolicy(**values)
    except ConfigError as error:
        raise ConfigError(
            error.key.replace("policy.", f"policy.institutions.{institution}.", 1), error.value, error.rule
        ) from None


def load_policy(path: str | Path) -> BankPolicy:
    """A real bank's policy file (YAML mapping of :class:`BankPolicy` keys); missing keys are conservative."""
    import yaml  # the config layer's YAML reader; policy files are small

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("policy", str(path), f"the bank's policy file cannot be read: {exc.strerror}") from None
    except yaml.YAMLError:
        raise ConfigError("policy", str(path), "the bank's policy file is not valid YAML") from None
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError("policy", str(path), "a policy file must be a mapping of keys to values")
    unknown = sorted(set(values) - set(_policy_fields()))
    if unknown:
        raise ConfigError(f"policy.{unknown[0]}", values[unknown[0]], "unknown policy key", ", ".join(_policy_fields()))
    merged = {name: getattr(CONSERVATIVE_POLICY, name) for name in _policy_fields()}
    merged.update(values)
    for key in ("min_noise_multiplier", "max_clipping_norm", "max_delta", "lifetime_epsilon"):
        if isinstance(merged[key], str):
            raise ConfigError(f"policy.{key}", merged[key], "must be a number", "YAML reads 1e-5 as text: write 1.0e-5")
    return BankPolicy(**merged)
