"""What the Python API returns: frozen dataclasses holding the run folder, the raw records and pandas data frames.

Every frame is built from the files the run wrote (``rounds.jsonl``, ``summary.json``, the server checkpoint,
``comparison.json``, the audit, the scores CSV), so ``load_run(folder)`` gives the same object as the call that
made the folder. Metric names are the summary's (``pr_auc``, ``model_round``, ``noise_multiplier``...): the wire
names with ``-`` as ``_`` and the renames of ``server/report.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fedchurn.api.folders import CHECKPOINT_DIR, ROUNDS_FILE, STATE_FILE, SUMMARY_FILE, RunInfo, inspect_run
from fedchurn.shared.config import FedChurnConfig, load_config

# Reply metric names that the summary renames (server/report.py SUMMARY_FIELDS); the rest: '-' becomes '_'.
_RENAMED = {"kept-round": "model_round", "kept-auc": "model_auc", "kept-ece": "model_ece"}
_KEYS = ("round", "phase", "institution")
_EVALUATION = (
    "auc",
    "pr_auc",
    "brier",
    "ece",
    "loss",
    "mean_probability",
    "churn_rate",
    "val_auc",
    "model_round",
    "model_auc",
    "model_ece",
    "n_test",
    "n_train",
)


def metric_name(wire: str) -> str:
    return _RENAMED.get(wire, wire.replace("-", "_"))


def records_frame(lines: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Every record of ``rounds.jsonl``: one row per reply (or missing reply), ``dropped`` True with a ``reason``."""
    rows = []
    for record in lines:
        row = {metric_name(k): v for k, v in record.items()}
        row["dropped"] = bool(row.get("dropped", False)) or "reason" in row
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else [*_KEYS, "dropped"])
    first = [c for c in (*_KEYS, "dropped", "reason") if c in frame.columns]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    if len(frame):
        frame["round"] = frame["round"].astype("int64")
    return frame.reset_index(drop=True)


def rounds_frame(records: pd.DataFrame) -> pd.DataFrame:
    """One row per round and institution that answered: σ and ε of its training, then what its evaluation
    released (AUC, PR-AUC, Brier, ECE, mean probability vs churn rate, the kept model). ``epsilon`` is the
    institution's ε at the end of the round (after its evaluation release when it made one)."""
    flags = ["round", "institution", "trained", "evaluated"]
    numbers = ["noise_multiplier", "epsilon_after_training", "epsilon", *_EVALUATION]
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    accepted = records[~records["dropped"]] if len(records) else records
    for record in accepted.to_dict("records"):
        key = (int(record["round"]), str(record["institution"]))
        row = rows.setdefault(key, {"round": key[0], "institution": key[1], "trained": False, "evaluated": False})
        if record["phase"] == "train":
            row["trained"] = True
            row["noise_multiplier"] = record.get("noise_multiplier")
            row["epsilon_after_training"] = record.get("epsilon")
        elif record["phase"] == "evaluate":
            row["evaluated"] = True
            row["epsilon"] = record.get("epsilon")
            row.update({name: record.get(name) for name in _EVALUATION})
    for row in rows.values():
        if row.get("epsilon") is None:
            row["epsilon"] = row.get("epsilon_after_training")
    frame = pd.DataFrame(list(rows.values()), columns=[*flags, *numbers])
    frame = frame.astype({"round": "int64", "trained": bool, "evaluated": bool, **dict.fromkeys(numbers, "float64")})
    return frame.sort_values(["round", "institution"]).reset_index(drop=True)


def institutions_frame(latest: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per institution: its latest released metrics (the summary's ``institutions``)."""
    rows = []
    for name, metrics in latest.items():
        row = {"institution": name, **metrics}
        if "round" in row and "evaluated_round" not in row:  # a stopped run's checkpoint names it 'round'
            row["evaluated_round"] = row.pop("round")
        rows.append(row)
    frame = _numeric_nulls_as_nan(pd.DataFrame(rows, columns=None if rows else ["institution"]))
    return frame.sort_values("institution").reset_index(drop=True) if len(frame) else frame


def _numeric_nulls_as_nan(frame: pd.DataFrame) -> pd.DataFrame:
    """A metric every bank left unreleased (null in JSON) is NaN in a numeric column, not a column of None."""
    for column in frame.columns:
        values = frame[column]
        if values.dtype == object and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values
        ):
            frame[column] = pd.to_numeric(values).astype("float64")
    return frame


@dataclass(frozen=True, eq=False)
class RunResult:
    """A federated run, from its folder: ``fedchurn.simulate(...)`` and ``fedchurn.load_run(folder)``.

    - ``institutions``: one row per bank, its latest released metrics (AUC, PR-AUC, Brier, ECE, ε, the kept model).
    - ``rounds``: one row per round and bank: σ, ε after training and at the end of the round, evaluation metrics.
    - ``records``: every line of ``rounds.jsonl`` (``phase`` train/evaluate, dropped replies with their reason).
    - ``dropped``: the dropped or missing replies.
    """

    run_dir: Path
    info: RunInfo
    config: FedChurnConfig | None
    summary: Mapping[str, Any] | None
    institutions: pd.DataFrame
    rounds: pd.DataFrame
    records: pd.DataFrame
    dropped: pd.DataFrame

    @property
    def status(self) -> str:
        return self.info.status_text

    @property
    def finished(self) -> bool:
        return self.info.status == "finished"

    def __repr__(self) -> str:
        return (
            f"RunResult({str(self.run_dir)!r}, {self.status}, {self.info.completed_rounds} rounds, "
            f"{len(self.institutions)} institutions)"
        )


def read_run(run_dir: str | Path) -> RunResult:
    info = inspect_run(run_dir)
    folder = info.path
    lines = []
    rounds_path = folder / ROUNDS_FILE
    if rounds_path.is_file():
        lines = [json.loads(line) for line in rounds_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    summary_path = folder / SUMMARY_FILE
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    if summary is not None:
        latest = summary.get("institutions", {})
    else:
        state_path = folder / CHECKPOINT_DIR / STATE_FILE
        state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
        latest = state.get("records", {}).get("latest", {})
    config = load_config(folder / "config.yaml") if (folder / "config.yaml").is_file() else None
    records = records_frame(lines)
    dropped = records[records["dropped"]].reset_index(drop=True) if len(records) else records
    return RunResult(
        run_dir=folder,
        info=info,
        config=config,
        summary=summary,
        institutions=institutions_frame(latest),
        rounds=rounds_frame(records),
        records=records,
        dropped=dropped,
    )


@dataclass(frozen=True, eq=False)
class ComparisonResult:
    """``fedchurn.compare(...)``: ``table`` has one row per institution and mode (AUC and PR-AUC mean and 95%
    half-width over seeds, largest ε); ``per_seed`` one row per institution, mode and seed (test AUC)."""

    out_dir: Path
    comparison: Mapping[str, Any]
    table: pd.DataFrame
    per_seed: pd.DataFrame


def read_comparison(out_dir: Path, comparison: Mapping[str, Any]) -> ComparisonResult:
    rows: list[dict[str, Any]] = []
    seeds: list[dict[str, Any]] = []
    for name, by_mode in comparison["institutions"].items():
        for mode, entry in by_mode.items():
            rows.append(
                {
                    "institution": name,
                    "mode": mode,
                    "label": comparison.get("mode_labels", {}).get(mode, mode),
                    "private": bool(comparison.get("private", {}).get(mode, False)),
                    **{k: entry.get(k) for k in ("auc", "auc_ci95", "pr_auc", "pr_auc_ci95", "epsilon", "runs")},
                }
            )
            for seed, auc in zip(comparison.get("seeds", []), entry.get("auc_per_seed", []), strict=False):
                seeds.append({"institution": name, "mode": mode, "seed": seed, "auc": auc})
    return ComparisonResult(
        out_dir=out_dir,
        comparison=comparison,
        table=pd.DataFrame(rows),
        per_seed=pd.DataFrame(seeds, columns=["institution", "mode", "seed", "auc"]),
    )


@dataclass(frozen=True)
class PretrainResult:
    """``fedchurn.pretrain(...)``: the encoder checkpoint and its provenance (``pretrain.json``)."""

    out_dir: Path
    checkpoint: Path
    metadata: Mapping[str, Any]
    metrics: Mapping[str, float]


@dataclass(frozen=True, eq=False)
class PredictionResult:
    """``fedchurn.predict(...)``: ``scores`` is the written CSV (id column if any, churn_probability,
    risk_decile); with labels in the input, ``metrics`` and the ``calibration`` table."""

    output: Path
    scores: pd.DataFrame
    model_round: int | None
    calibrated: bool
    metrics: Mapping[str, float] | None
    calibration: pd.DataFrame


@dataclass(frozen=True, eq=False)
class AuditResult:
    """``fedchurn.audit(run_dir)``: every institution's ledger checked and its ε recomposed independently.
    ``institutions``: one row per bank; ``rounds``: one row per bank and round of its ledger."""

    run_dir: Path
    passed: bool
    report: Mapping[str, Any]  # RunAudit.to_dict()
    institutions: pd.DataFrame
    rounds: pd.DataFrame


def read_audit(report: Mapping[str, Any]) -> AuditResult:
    banks: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    for entry in report["institutions"]:
        banks.append(
            {
                "institution": entry["institution"],
                "passed": entry["passed"],
                "epsilon": entry["epsilon"],
                "epsilon_pld_independent": entry["epsilon_pld_independent"],
                "epsilon_rdp_independent": entry["epsilon_rdp_independent"],
                "max_epsilon": entry["max_epsilon"],
                "budget_remaining": entry["budget_remaining"],
                "lifetime_epsilon": entry["lifetime_epsilon"],
                "findings": len(entry["findings"]),
                "tampering": len(entry["tampering"]),
            }
        )
        rounds.extend({"institution": entry["institution"], **row} for row in entry["rounds"])
    return AuditResult(
        run_dir=Path(report["run_dir"]),
        passed=bool(report["passed"]),
        report=report,
        institutions=pd.DataFrame(banks),
        rounds=pd.DataFrame(rounds),
    )


@dataclass(frozen=True, eq=False)
class SplitExport:
    """``fedchurn.export_split(...)``: one row per institution and part (train, validation, test) in ``files``."""

    out_dir: Path
    files: pd.DataFrame
    key_source: Mapping[str, str] = field(default_factory=dict)  # institution -> where its split key came from
