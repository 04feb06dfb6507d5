"""How an institution declines a training round, on the wire (flwr only; no torch — the server reads it too).

A decline is a normal reply, not an error: no arrays, the identity record, a ConfigRecord ``status`` holding
``{"status": "declined", "reason": CODE}`` with CODE from a fixed list, and a MetricRecord ``metrics`` with
exactly :data:`DECLINE_METRICS`. Like the train and evaluate whitelists in ``shared/wire.py``, the code list and
the metric whitelist are the privacy boundary: no free text leaves the institution; the server writes the
human-readable reason from the code and the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedchurn.shared.policy import (
    POLICY_CLIPPING_TOO_HIGH,
    POLICY_DELTA_TOO_HIGH,
    POLICY_DP_REQUIRED,
    POLICY_MODE_NOT_ALLOWED,
    POLICY_NOISE_TOO_LOW,
    POLICY_REPRODUCIBLE_NOISE,
    POLICY_TOO_MANY_ROUNDS,
)
from fedchurn.shared.wire import IDENTITY_KEY, METRICS_KEY, identity_record

STATUS_KEY = "status"  # the ConfigRecord of a decline
STATUS_FIELD = "status"
REASON_FIELD = "reason"
DECLINED = "declined"

BUDGET_EXHAUSTED = "budget-exhausted"  # the next round would take the bank's lifetime ε past its cap
DP_DISABLED = "dp-disabled"  # a budget is set but DP is off: no finite ε to keep within it
# The run's δ is not below 1/n for the bank's n training rows (then publishing one random customer's row would
# itself be (0, δ)-DP). n stays at the bank: the code says only that the rule was broken.
DELTA_TOO_HIGH_FOR_ROWS = "delta-too-high-for-rows"
# The bank's own policy refused the instruction (shared/policy.py); its log says which rule refused which value.
POLICY_REASONS = {
    POLICY_DP_REQUIRED: "its policy requires DP and the run asked for none",
    POLICY_NOISE_TOO_LOW: "the run's noise multiplier is below its policy's minimum",
    POLICY_CLIPPING_TOO_HIGH: "the run's clipping norm is above its policy's maximum",
    POLICY_DELTA_TOO_HIGH: "the run's δ is above its policy's maximum",
    POLICY_MODE_NOT_ALLOWED: "its policy does not allow the run's transfer mode",
    POLICY_TOO_MANY_ROUNDS: "its policy allows fewer rounds per run",
    POLICY_REPRODUCIBLE_NOISE: "a real bank never trains with noise the server can regenerate",
}
# The bank hit an error: a fixed code and message leave; the exception's text stays in the bank's own log.
ERROR_DATA = "error-data"
ERROR_CONFIG = "error-config"
ERROR_STATE = "error-state"
ERROR_INTERNAL = "error-internal"
ERROR_REASONS = {
    ERROR_DATA: "its data could not be read or prepared as the run asks (details in the bank's own log)",
    ERROR_CONFIG: "the run's configuration is not valid at the bank (details in the bank's own log)",
    ERROR_STATE: "its saved state or ledger could not be used (details in the bank's own log)",
    ERROR_INTERNAL: "an internal error (details in the bank's own log)",
}
# An evaluate reply with no metrics: evaluation is off, or a release is not allowed now (the bank's own log says
# which rule); never a training decline.
EVALUATION_WITHHELD = "evaluation-withheld"
REASON_CODES = (
    BUDGET_EXHAUSTED,
    DP_DISABLED,
    DELTA_TOO_HIGH_FOR_ROWS,
    EVALUATION_WITHHELD,
    *POLICY_REASONS,
    *ERROR_REASONS,
)

DECLINE_METRICS = ("epsilon", "projected-epsilon", "max-epsilon", "delta", "rounds-trained")


@dataclass(frozen=True)
class Decline:
    """Why an institution does not train this round, with the numbers behind it."""

    reason: str  # one of REASON_CODES
    epsilon: float  # the bank's lifetime ε on these rows so far (every run composed)
    projected_epsilon: float  # ε after one more round (inf without DP)
    max_epsilon: float  # the institution's budget
    delta: float
    rounds_trained: int

    def metrics(self) -> dict[str, float]:
        return {
            "epsilon": self.epsilon,
            "projected-epsilon": self.projected_epsilon,
            "max-epsilon": self.max_epsilon,
            "delta": self.delta,
            "rounds-trained": float(self.rounds_trained),
        }

    @classmethod
    def code_only(cls, reason: str) -> Decline:
        """A decline whose numbers say nothing (policy and error codes): all zero."""
        return cls(reason=reason, epsilon=0.0, projected_epsilon=0.0, max_epsilon=0.0, delta=0.0, rounds_trained=0)

    def explain(self) -> str:
        if self.reason == EVALUATION_WITHHELD:
            return "released no evaluation statistics (its evaluation policy or budget allows none now)"
        if self.reason in POLICY_REASONS:
            return f"declined by the bank's own policy ({self.reason}): {POLICY_REASONS[self.reason]}"
        if self.reason in ERROR_REASONS:
            return f"the bank replied with an error ({self.reason}): {ERROR_REASONS[self.reason]}"
        if self.reason == DELTA_TOO_HIGH_FOR_ROWS:
            return (
                "declined: the run's δ is not below 1/n for the bank's training rows n (set privacy.delta well "
                "below 1 / the largest bank's rows, e.g. 1e-6)"
            )
        if self.reason == DP_DISABLED:
            return f"privacy is disabled (no finite ε), so no round fits the budget ε <= {self.max_epsilon:g}"
        return (
            f"another round would take ε from {self.epsilon:.4g} to {self.projected_epsilon:.4g}, "
            f"above its budget {self.max_epsilon:g} (δ = {self.delta:g})"
        )


def decline_content(institution: str, decline: Decline) -> RecordDict:
    return RecordDict(
        {
            METRICS_KEY: MetricRecord({key: float(value) for key, value in decline.metrics().items()}),
            IDENTITY_KEY: identity_record(institution),
            STATUS_KEY: ConfigRecord({STATUS_FIELD: DECLINED, REASON_FIELD: decline.reason}),
        }
    )


def is_decline(message: Message) -> bool:
    """Whether the reply says it declines (it may still be malformed: see :func:`read_decline`)."""
    if message.has_error() or STATUS_KEY not in message.content.config_records:
        return False
    return message.content.config_records[STATUS_KEY].get(STATUS_FIELD) == DECLINED


def read_decline(message: Message) -> Decline | str:
    """The decline a reply carries, or why it is not an acceptable decline."""
    content = message.content
    if set(content.array_records):
        return "a decline must carry no arrays"
    if set(content.config_records) != {IDENTITY_KEY, STATUS_KEY}:
        return f"a decline carries exactly the records {IDENTITY_KEY!r} and {STATUS_KEY!r}"
    status = content.config_records[STATUS_KEY]
    if set(status) != {STATUS_FIELD, REASON_FIELD} or status.get(REASON_FIELD) not in REASON_CODES:
        return f"a decline's status must be {{status, reason}} with reason one of {list(REASON_CODES)}"
    if set(content.metric_records) != {METRICS_KEY}:
        return f"a decline carries one metric record {METRICS_KEY!r}"
    metrics: Mapping[str, object] = content.metric_records[METRICS_KEY]
    if set(metrics) != set(DECLINE_METRICS):
        return f"a decline's metrics must be exactly {list(DECLINE_METRICS)}, got {sorted(metrics)}"
    values = {}
    for key in DECLINE_METRICS:
        value = metrics[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return f"decline metric {key!r} must be a number, got {value!r}"
        values[key] = float(value)
    return Decline(
        reason=str(status[REASON_FIELD]),
        epsilon=values["epsilon"],
        projected_epsilon=values["projected-epsilon"],
        max_epsilon=values["max-epsilon"],
        delta=values["delta"],
        rounds_trained=int(values["rounds-trained"]),
    )
