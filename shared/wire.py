"""What travels between the server and the institutions: record keys, metric whitelists, array conversion.

numpy + flwr only (no torch), so the server's aggregation path stays torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

ARRAYS_KEY = "arrays"  # the encoder, both ways
CONFIG_KEY = "config"  # server -> institution: round settings
METRICS_KEY = "metrics"  # institution -> server: whitelisted numbers only
IDENTITY_KEY = "identity"  # institution -> server: who replied (the institution's public name)
INSTITUTION_FIELD = "institution"
WEIGHT_KEY = "num-examples"  # FedAvg weight: 1.0, or the rows trained on when the bank's policy allows it

# DP-SGD protects the weights, not what a client says about them: anything outside these lists is not sent.
# No exact row count: the FedAvg weight is 1.0 unless the bank's policy allows report_dataset_size, and the sample
# rate and step counts (q = 1/ceil(n/B) reveals n) stay at the bank.
TRAIN_METRICS = (
    WEIGHT_KEY,
    "epsilon",
    "delta",
    "noise-multiplier",
)
# Evaluation metrics are computed at the bank from DP-released score histograms only (clients/private_metrics.py);
# num-examples and n-test are the noisy test-row count.
EVALUATE_METRICS = (
    WEIGHT_KEY,
    "auc",
    "pr-auc",
    "brier",
    "ece",
    "loss",
    "mean-probability",
    "churn-rate",
    "val-auc",
    "kept-round",
    "kept-auc",
    "kept-ece",
    "epsilon",
    "delta",
    "n-train",
    "n-test",
)
# The reliability diagram of the released test histogram, one triple per histogram bin j (0 <= j < bins): the
# calibrated probability of the bin, its noisy churn rate (NaN when its noisy row count is not positive) and its
# noisy row count (clipped at 0). Post-processing of the DP test histogram: no further privacy cost.
CALIBRATION_FAMILIES = ("cal-prob", "cal-rate", "cal-rows")
MAX_CALIBRATION_BINS = 1000  # the most evaluation.bins allows (shared/config_schema.py)


def calibration_metrics(bins: int) -> tuple[str, ...]:
    """The per-bin keys of a reply with ``bins`` histogram bins: each ``cal-prob-j``, ``cal-rate-j``, ``cal-rows-j``."""
    return tuple(f"{family}-{j}" for family in CALIBRATION_FAMILIES for j in range(bins))


def evaluate_metrics(bins: int) -> tuple[str, ...]:
    """Everything a bank's evaluate reply carries with ``bins`` histogram bins (evaluation.bins)."""
    return EVALUATE_METRICS + calibration_metrics(bins)


def calibration_key(key: str) -> tuple[str, int] | None:
    """``(family, j)`` for a well-formed per-bin key (``cal-rate-3``), else None (``cal-rate-03`` included)."""
    family, _, index = key.rpartition("-")
    if family not in CALIBRATION_FAMILIES or not index.isdigit() or not index.isascii() or str(int(index)) != index:
        return None
    return family, int(index)


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in record.items()}


def whitelisted_metrics(values: Mapping[str, float], allowed: tuple[str, ...]) -> MetricRecord:
    """Build a MetricRecord from the allowed keys only; a missing allowed key is a programming error."""
    return MetricRecord({key: float(values[key]) for key in allowed})


def identity_record(institution: str) -> ConfigRecord:
    return ConfigRecord({INSTITUTION_FIELD: institution})
