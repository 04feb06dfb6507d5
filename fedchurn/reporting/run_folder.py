"""What a run folder holds, read once for the report: the server's summary and per-round records, each simulated
bank's kept-model record, and a comparison when one was written there.

Nothing here trusts the folder's contents to be well formed: a missing or unreadable file leaves its part of the
report empty (the report says so) instead of failing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedchurn.shared.wire import MAX_CALIBRATION_BINS

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"  # server/report.py
ROUNDS_FILE = "rounds.jsonl"  # server/report.py
CONFIG_FILE = "config.yaml"
COMPARISON_FILE = "comparison.json"  # fedchurn/comparison/runner.py
INSTITUTIONS_DIR = "institutions"  # each simulated bank's state folder
KEPT_RECORD_FILE = "kept-model.json"  # clients/private_evaluation.py


@dataclass(frozen=True)
class ReliabilityBin:
    """One histogram bin of a bank's released test histogram: calibrated probability, noisy churn rate, noisy rows."""

    probability: float
    rate: float | None  # None: the noise left the bin without rows
    rows: float


def reliability_of(record: Mapping[str, Any]) -> tuple[ReliabilityBin, ...]:
    """The per-bin figures of one evaluate record (``cal-prob-j``, ``cal-rate-j``, ``cal-rows-j`` for j = 0, 1, ...),
    stopping at the first bin without a probability and row count; empty when there are none."""
    bins = []
    for j in range(MAX_CALIBRATION_BINS):
        probability, rows = _number(record.get(f"cal-prob-{j}")), _number(record.get(f"cal-rows-{j}"))
        if probability is None or rows is None:
            break
        bins.append(ReliabilityBin(probability=probability, rate=_number(record.get(f"cal-rate-{j}")), rows=rows))
    return tuple(bins)


@dataclass(frozen=True)
class BankSeries:
    """One bank's figures, round by round, as the server recorded them (None: not released / undefined)."""

    auc: dict[int, float | None] = field(default_factory=dict)  # DP-released test AUC per evaluated round
    ece: dict[int, float | None] = field(default_factory=dict)
    epsilon: dict[int, float | None] = field(default_factory=dict)  # lifetime ε reported by the end of the round
    noise_multiplier: float | None = None  # σ of its last training round
    dropped: int = 0  # replies the server dropped
    # the reliability diagram of its last release that carried one: (round, bins); see :func:`reliability_of`
    reliability: tuple[int, tuple[ReliabilityBin, ...]] | None = None


@dataclass(frozen=True)
class RunFolder:
    path: Path
    summary: dict[str, Any] | None
    series: dict[str, BankSeries]
    kept: dict[str, dict[str, Any]]  # bank -> kept-model.json (simulated banks only: a real bank keeps its own)
    comparison: dict[str, Any] | None
    config_text: str | None
    sub_reports: tuple[Path, ...]  # report pages of the runs a comparison made (relative to ``path``)

    @property
    def institutions(self) -> list[str]:
        names = set(self.series)
        if self.summary:
            names.update(self.summary.get("institutions") or {})
            names.update((self.summary.get("budget") or {}).get("stopped") or {})
        return sorted(names)

    @property
    def config(self) -> dict[str, Any]:
        value = (self.summary or {}).get("config")
        return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        logger.warning("report: %s is unreadable (%s); its part of the report is left out", path, exc)
        return None


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                logger.warning("report: %s line %d is not JSON; skipped", path, number)
                continue
            if isinstance(record, dict) and isinstance(record.get("institution"), str):
                records.append(record)
    return records


def bank_series(records: list[dict[str, Any]]) -> dict[str, BankSeries]:
    """Per bank: AUC and ECE per evaluated round, the largest ε reported in each round, the last training σ."""
    auc: dict[str, dict[int, float | None]] = {}
    ece: dict[str, dict[int, float | None]] = {}
    epsilon: dict[str, dict[int, float | None]] = {}
    sigma: dict[str, float | None] = {}
    dropped: dict[str, int] = {}
    reliability: dict[str, tuple[int, tuple[ReliabilityBin, ...]]] = {}
    for record in records:
        name = record["institution"]
        round_number = record.get("round")
        if not isinstance(round_number, int) or isinstance(round_number, bool):
            continue
        epsilon.setdefault(name, {})
        if record.get("dropped"):
            dropped[name] = dropped.get(name, 0) + 1
            continue
        spent = _number(record.get("epsilon"))
        if spent is not None:
            earlier = epsilon[name].get(round_number)
            epsilon[name][round_number] = spent if earlier is None else max(earlier, spent)
        if record.get("phase") == "train" and "noise-multiplier" in record:
            sigma[name] = _number(record.get("noise-multiplier"))
        if record.get("phase") == "evaluate":
            auc.setdefault(name, {})[round_number] = _number(record.get("auc"))
            ece.setdefault(name, {})[round_number] = _number(record.get("ece"))
            bins = reliability_of(record)
            if bins and (name not in reliability or reliability[name][0] <= round_number):
                reliability[name] = (round_number, bins)
    return {
        name: BankSeries(
            auc=auc.get(name, {}),
            ece=ece.get(name, {}),
            epsilon=epsilon.get(name, {}),
            noise_multiplier=sigma.get(name),
            dropped=dropped.get(name, 0),
            reliability=reliability.get(name),
        )
        for name in sorted(epsilon)
    }


def read_run_folder(path: Path) -> RunFolder:
    """Everything the report shows, from a run folder or a comparison folder."""
    summary = _read_json(path / SUMMARY_FILE)
    comparison = _read_json(path / COMPARISON_FILE)
    kept: dict[str, dict[str, Any]] = {}
    banks = path / INSTITUTIONS_DIR
    if banks.is_dir():
        for folder in sorted(banks.iterdir()):
            record = _read_json(folder / KEPT_RECORD_FILE) if folder.is_dir() else None
            if isinstance(record, dict):
                kept[folder.name] = record
    config_path = path / CONFIG_FILE
    try:
        config_text = config_path.read_text(encoding="utf-8", errors="replace") if config_path.is_file() else None
    except OSError:
        config_text = None
    sub_reports = tuple(
        sorted(p.relative_to(path) for p in path.glob("seed-*/*/report.html")) if comparison is not None else ()
    )
    return RunFolder(
        path=path,
        summary=summary if isinstance(summary, dict) else None,
        series=bank_series(_read_rounds(path / ROUNDS_FILE)),
        kept=kept,
        comparison=comparison if isinstance(comparison, dict) else None,
        config_text=config_text,
        sub_reports=sub_reports,
    )


def lifetime_cap(config: Mapping[str, Any], institution: str) -> float | None:
    """The lifetime ε cap a SIMULATED bank applies: its policy's cap lowered by the config's budget (as
    clients/budget.py computes it). A real bank's own policy file is not in the run folder."""
    caps: list[float] = []
    budget = config.get("budget") or {}
    per_bank = budget.get("institution_epsilon") or {}
    budget_cap = _number(per_bank.get(institution, budget.get("max_epsilon")))
    if budget_cap is not None:
        caps.append(budget_cap)
    policy = config.get("policy") or {}
    override = (policy.get("institutions") or {}).get(institution) or {}
    policy_cap = _number(override.get("lifetime_epsilon")) if override.get("lifetime_epsilon") is not None else None
    if policy_cap is None:
        policy_cap = _number(policy.get("lifetime_epsilon"))
    if policy_cap is not None:
        caps.append(policy_cap)
    return min(caps) if caps else None


def evaluation_sigma(config: Mapping[str, Any], institution: str) -> float | None:
    """σ_e of a simulated bank's evaluation releases: the larger of the config's and its policy's."""
    evaluation = config.get("evaluation") or {}
    if evaluation.get("mode") == "off":
        return None
    policy = config.get("policy") or {}
    override = (policy.get("institutions") or {}).get(institution) or {}
    values = [
        _number(evaluation.get("noise_multiplier")),
        _number(override.get("evaluation_noise_multiplier", policy.get("evaluation_noise_multiplier"))),
    ]
    finite = [v for v in values if v is not None]
    return max(finite) if finite else None
