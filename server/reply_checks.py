"""Shape and type checks of an institution's reply, before any of it is used (flwr + numpy + stdlib; no torch).

Any reply may be hostile. Each function here returns *why* a part of a reply is unacceptable, or None, and never
raises on any content a reply can carry (lists where numbers belong, booleans, strings, NaN, inf, huge numbers,
missing or extra records, wrong shapes or dtypes). The strategy drops a reply with the first reason found.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Message

from fedchurn.shared.wire import (
    CALIBRATION_FAMILIES,
    IDENTITY_KEY,
    INSTITUTION_FIELD,
    MAX_CALIBRATION_BINS,
    WEIGHT_KEY,
    calibration_key,
)

LEDGER_KEY = "ledger"  # optional ConfigRecord of a train reply: the institution's signed ledger entry
LEDGER_FIELDS = ("record-hash", "signature", "public-key")
MAX_LEDGER_FIELD_CHARS = 4096
MAX_NAME_CHARS = 128
# Metrics that may be +inf by design (ε of a run without DP); every other metric must be finite.
MAY_BE_INFINITE = frozenset({"epsilon"})
# Evaluation figures computed from a bank's DP-noised histograms: NaN when the noise left a class empty (the figure
# is undefined, not wrong). Nothing else may be NaN.
MAY_BE_UNDEFINED = frozenset(
    {"auc", "pr-auc", "val-auc", "brier", "ece", "loss", "mean-probability", "churn-rate", "kept-auc", "kept-ece"}
    | {"kept-round"}
)
MAX_BIN_ROWS = 1e9  # a noisy row count of one histogram bin above this is no bank's


def check_metrics(metrics: Mapping[str, Any], allowed: tuple[str, ...], *, per_bin: bool = False) -> str | None:
    """Why these reply metrics are unacceptable, or None: exactly ``allowed``, each one number.

    NaN only for the figures of a noisy histogram (:data:`MAY_BE_UNDEFINED`). With ``per_bin`` (evaluate replies)
    the reply may also carry the reliability figures of its test histogram: for some B in
    [2, :data:`~fedchurn.shared.wire.MAX_CALIBRATION_BINS`], every ``cal-prob-j``, ``cal-rate-j`` and ``cal-rows-j``
    for j < B and no other (:func:`check_calibration_bins`).
    """
    if not per_bin:
        return _check_exact(metrics, allowed)
    if len(metrics) > len(allowed) + len(CALIBRATION_FAMILIES) * MAX_CALIBRATION_BINS:
        return f"{len(metrics)} metrics: more than the whitelist allows"
    plain = {key: value for key, value in metrics.items() if not (isinstance(key, str) and calibration_key(key))}
    return _check_exact(plain, allowed) or check_calibration_bins(
        {key: value for key, value in metrics.items() if key not in plain}
    )


def check_calibration_bins(metrics: Mapping[str, Any]) -> str | None:
    """Why these per-bin figures are unacceptable, or None. None present is fine (no diagram).

    Each of the three families holds the same bins 0..B-1, 2 <= B <= MAX_CALIBRATION_BINS; ``cal-prob-j`` is a
    probability in [0, 1], ``cal-rate-j`` one too or NaN (a bin the noise left empty), ``cal-rows-j`` a finite
    count in [0, MAX_BIN_ROWS].
    """
    if not metrics:
        return None
    indices: dict[str, set[int]] = {family: set() for family in CALIBRATION_FAMILIES}
    for key in metrics:
        family, j = calibration_key(key) or ("", -1)
        indices[family].add(j)
    bins = len(indices[CALIBRATION_FAMILIES[0]])
    if not 2 <= bins <= MAX_CALIBRATION_BINS or any(found != set(range(bins)) for found in indices.values()):
        return (
            f"per-bin calibration figures must be {', '.join(f'{f}-j' for f in CALIBRATION_FAMILIES)} for every "
            f"j from 0 to B-1, with 2 <= B <= {MAX_CALIBRATION_BINS}"
        )
    for key, value in metrics.items():
        if not is_number(value):
            return f"metric '{key}' must be one number, got {type(value).__name__} {_short(value)}"
        number = float(value)
        family = (calibration_key(key) or ("", 0))[0]
        if family == "cal-rate" and math.isnan(number):
            continue
        high = MAX_BIN_ROWS if family == "cal-rows" else 1.0
        if not 0.0 <= number <= high:  # False for NaN
            return f"metric '{key}' must be in [0, {high:g}], got {number!r}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_number(value: Any) -> bool:
    """A real int or float (not a bool, list, string or anything else)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_exact(metrics: Mapping[str, Any], allowed: tuple[str, ...]) -> str | None:
    extra = sorted(str(key) for key in set(metrics) - set(allowed))
    if extra:
        return f"metrics outside the whitelist: {extra[:10]}"
    missing = sorted(set(allowed) - set(metrics))
    if missing:
        return f"metrics missing: {missing}"
    for key in allowed:
        value = metrics[key]
        if not is_number(value):
            return f"metric '{key}' must be one number, got {type(value).__name__} {_short(value)}"
        number = float(value)
        if math.isnan(number) and key in MAY_BE_UNDEFINED:
            continue
        if math.isnan(number) or (math.isinf(number) and not (key in MAY_BE_INFINITE and number > 0)):
            return f"metric '{key}' must be finite, got {number!r}"
    weight = float(metrics[WEIGHT_KEY])
    if weight <= 0:
        return f"'{WEIGHT_KEY}' must be a positive number, got {weight!r}"
    return None


def reply_institution(message: Message) -> str | None:
    """The institution a well-formed reply names, or None (no identity record, or not a short non-empty string)."""
    if message.has_error():
        return None
    content = message.content
    if IDENTITY_KEY not in content.config_records:
        return None
    name = content.config_records[IDENTITY_KEY].get(INSTITUTION_FIELD)
    return name if isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS else None


def check_identity_record(message: Message) -> str | None:
    record = message.content.config_records[IDENTITY_KEY]
    if set(record) != {INSTITUTION_FIELD}:
        return f"the '{IDENTITY_KEY}' record must hold only '{INSTITUTION_FIELD}', got {sorted(record)[:10]}"
    return None


def check_ledger_record(record: Mapping[str, Any]) -> str | None:
    """A train reply's optional ``ledger`` record: string fields from :data:`LEDGER_FIELDS`, each bounded."""
    extra = sorted(str(key) for key in set(record) - set(LEDGER_FIELDS))
    if extra:
        return f"the '{LEDGER_KEY}' record holds fields outside {list(LEDGER_FIELDS)}: {extra[:10]}"
    for key, value in record.items():
        if not isinstance(value, str) or len(value) > MAX_LEDGER_FIELD_CHARS:
            return f"'{LEDGER_KEY}.{key}' must be a string of at most {MAX_LEDGER_FIELD_CHARS} characters"
    return None


def check_config_records(message: Message, *, allow_ledger: bool) -> str | None:
    """Only the identity record (and, in training, the ledger record); each well-formed."""
    allowed = {IDENTITY_KEY, LEDGER_KEY} if allow_ledger else {IDENTITY_KEY}
    records = message.content.config_records
    extra = sorted(set(records) - allowed)
    if extra:
        return f"unexpected config records {extra[:10]}"
    problem = check_identity_record(message)
    if problem is None and LEDGER_KEY in records:
        problem = check_ledger_record(records[LEDGER_KEY])
    return problem


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - reference`` over every key, in float64 (inf when it overflows, never an error)."""
    squared = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for key, ref in reference.items():
            delta = arrays[key].astype(np.float64) - ref.astype(np.float64)
            squared += float(np.sum(delta * delta))
    return math.sqrt(squared) if math.isfinite(squared) else math.inf


def check_encoder_update(
    arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    max_update_norm: float | None,
) -> str | None:
    """Why an encoder sent back cannot be aggregated, or None. Pure numpy."""
    missing = sorted(set(reference) - set(arrays))
    unexpected = sorted(set(arrays) - set(reference))
    if missing or unexpected:
        return f"wrong keys (missing {missing[:10]}, unexpected {unexpected[:10]})"
    for key, ref in reference.items():
        value = arrays[key]
        if value.shape != ref.shape:
            return f"'{key}' has shape {value.shape}, expected {ref.shape}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"'{key}' has dtype {value.dtype}, expected floating point"
        if not np.all(np.isfinite(value)):
            return f"'{key}' holds non-finite values"
    norm = update_norm(arrays, reference)
    if not math.isfinite(norm):
        return "update norm overflows (values too large)"
    if max_update_norm is not None and norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds strategy.max_update_norm {max_update_norm:.4g}"
    return None


def relative_bounds(norms: Mapping[str, float], multiplier: float | None) -> dict[str, float]:
    """Per reply, the most its value (update norm, weight) may be: ``multiplier`` × the median of the *other*
    replies this round (leave-one-out, so with two replies neither sets its own bound). Empty with < 2 replies."""
    if multiplier is None or len(norms) < 2:
        return {}
    bounds = {}
    for name in norms:
        others = [value for other, value in norms.items() if other != name]
        bounds[name] = multiplier * float(np.median(others))
    return bounds


def check_member(message: Message, name: str, members: Mapping[int, str] | None) -> str | None:
    """Whether the node that sent this reply is registered under the institution the reply names.

    ``members`` maps the node id the SuperLink authenticated (from the node's registered key) to the institution
    registered for it; None means no registry (the reply's name is taken as said, which the server logs once).
    """
    if members is None:
        return None
    node = message.metadata.src_node_id
    registered = members.get(node)
    if registered is None:
        return f"node {node} is not in the member registry (it names itself '{name[:MAX_NAME_CHARS]}')"
    if registered != name:
        return f"the reply names '{name}' but node {node} is registered as '{registered}': impersonation refused"
    return None
