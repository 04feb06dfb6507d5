"""Scoring new customers at one institution with what a run left there: encoder, head and preprocessor.

Reads ``RUN/config.yaml`` (schema, model, transfer mode), ``RUN/encoder.pt`` (checked against the schema),
``RUN/institutions/NAME/head.pt`` (``RUN/global-head.pt`` for a fedavg run, whose head is the shared one) and
``RUN/institutions/NAME/preprocessor.json`` (that institution's own scaling and imputation).

When the institution kept a model (``kept-model.pt`` + ``kept-model.json``: encoder, head and calibrator of its
best round by DP validation score, written by ``clients/private_evaluation.py``), that model is used: each row gets
a *calibrated* churn probability and a risk decile (1..10, 10 = highest risk) from thresholds fixed at the bank,
so a customer's decile does not depend on the other rows of the file. Otherwise (evaluation off, an older run)
the run's final encoder and head are used, probabilities are the model's own (uncalibrated) and deciles are
ranked within the file. With a label column, AUC, Brier score, ECE and a calibration table are reported too.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedchurn.clients.calibration import Calibrator
from fedchurn.clients.evaluation import predict_logits
from fedchurn.clients.metrics import brier_score, calibration_table, expected_calibration_error, risk_deciles, roc_auc
from fedchurn.clients.preprocessor import Preprocessor
from fedchurn.clients.private_evaluation import KEPT_MODEL_FILE, KEPT_RECORD_FILE
from fedchurn.shared.config import FedChurnConfig, load_config
from fedchurn.shared.errors import CheckpointError, DataError, FedChurnError
from fedchurn.shared.institution_file import read_csv_table
from fedchurn.shared.institution_rows import resolve_schema
from fedchurn.shared.model import (
    ChurnModel,
    build_model,
    check_state,
    load_encoder_arrays,
    load_encoder_checkpoint,
    load_head_state,
)
from fedchurn.shared.sharing import GLOBAL_HEAD_FILE
from fedchurn.shared.table_io import read_csv_text

CONFIG_FILE = "config.yaml"
ENCODER_FILE = "encoder.pt"
HEAD_FILE = "head.pt"
PREPROCESSOR_FILE = "preprocessor.json"
ID_NAMES = ("id", "customer_id", "customerid", "client_id", "clientnum", "account_id")
OUTPUT_COLUMNS = ("churn_probability", "risk_decile")


@dataclass(frozen=True)
class ScoringResult:
    rows: int
    output: Path
    id_column: str | None
    mean_probability: float
    calibrated: bool = False  # the kept model's calibrator and fixed deciles were used
    model_round: int | None = None  # the round the kept model comes from
    metrics: dict[str, float] | None = None  # with labels in the input: auc, brier, ece, churn_rate, ...
    calibration: list[dict[str, float]] = field(default_factory=list)  # with labels: the calibration table


def _required_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found", path=str(path), fix=fix)
    return path


def _id_column(header: tuple[str, ...], drop: tuple[str, ...], requested: str | None, path: str) -> int | None:
    if requested is not None:
        if requested not in header:
            raise DataError(f"id column {requested!r} is not in the file", path=path, column=requested)
        return header.index(requested)
    for name in drop:  # identifiers the schema drops (CLIENTNUM, customerID, ...)
        if name in header:
            return header.index(name)
    for index, name in enumerate(header):
        if name.strip().lower() in ID_NAMES:
            return index
    return None


def score_customers(
    run_dir: str | Path,
    institution: str,
    input_path: str | Path,
    output_path: str | Path,
    *,
    id_column: str | None = None,
    overwrite: bool = False,
) -> ScoringResult:
    """Score ``input_path`` with ``institution``'s model from ``run_dir``; write ``output_path`` (CSV)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError("run folder not found", path=str(run), fix="give the --out folder of a fedchurn simulate run")
    _required_file(run / CONFIG_FILE, "run config", "is this the output folder of a fedchurn simulate run?")
    config = load_config(run / CONFIG_FILE)
    home = run / "institutions" / institution
    if not home.is_dir():
        known = sorted(p.name for p in (run / "institutions").glob("*") if p.is_dir())
        raise DataError(
            f"no institution named {institution!r} in this run",
            path=str(run),
            fix=f"institutions of this run: {', '.join(known) or 'none'}",
        )
    source = Path(input_path)
    _required_file(source, "input file", "give the CSV of customers to score with --input")
    target = Path(output_path)
    if target.resolve() == source.resolve():
        raise DataError("the output would overwrite the input", path=str(target), fix="choose another --output")
    if target.exists() and not overwrite:
        raise DataError("output file already exists", path=str(target), fix="choose another --output or --overwrite")

    schema = resolve_schema(config.data)
    preprocessor = Preprocessor.from_dict(
        _load_json(_required_file(home / PREPROCESSOR_FILE, "preprocessor", "the institution never trained"))
    )
    if preprocessor.feature_names != schema.feature_names:
        raise CheckpointError(f"{home / PREPROCESSOR_FILE} does not match the run's schema (config.yaml)")
    kept = _kept_model(home, config, len(schema.feature_names))
    model = kept[0] if kept is not None else final_model(run, home, config, schema.feature_names)

    missing = "impute" if config.data.missing_values == "drop" else config.data.missing_values  # score every row
    table = read_csv_table(source, schema, institution=institution, missing_values=missing, require_label=False)
    logits = predict_logits(model, preprocessor.transform(table)).double().numpy()
    if kept is not None:
        calibrator = kept[1]
        probabilities = calibrator.probabilities(logits)
        deciles = calibrator.deciles(logits)
    else:
        probabilities = 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid, no overflow
        deciles = risk_deciles(probabilities)
    metrics, calibration = _labelled_metrics(table.labels, probabilities)

    text = read_csv_text(source)
    id_index = _id_column(text.header, schema.drop, id_column, str(source))
    ids_by_line = {line: row for line, row in zip(text.lines, text.rows, strict=True)}
    header = ([text.header[id_index]] if id_index is not None else []) + list(OUTPUT_COLUMNS)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for line, p, decile in zip(table.line_numbers.tolist(), probabilities, deciles, strict=True):
            prefix = [ids_by_line[line][id_index]] if id_index is not None else []
            writer.writerow([*prefix, f"{p:.6f}", int(decile)])
    os.replace(tmp, target)
    return ScoringResult(
        rows=table.n_rows,
        output=target,
        id_column=text.header[id_index] if id_index is not None else None,
        mean_probability=float(np.mean(probabilities)) if len(probabilities) else float("nan"),
        calibrated=kept is not None,
        model_round=kept[2] if kept is not None else None,
        metrics=metrics,
        calibration=calibration,
    )


def _kept_model(home: Path, config: FedChurnConfig, input_dim: int) -> tuple[ChurnModel, Calibrator, int] | None:
    """The model the institution kept (best round by DP validation score) and its calibrator, if it kept one."""
    model_path, record_path = home / KEPT_MODEL_FILE, home / KEPT_RECORD_FILE
    if not (model_path.is_file() and record_path.is_file()):
        return None
    record = _load_json(record_path)
    privacy_path = home / "privacy.json"  # the institution's state: which run it belongs to now
    current = _load_json(privacy_path).get("run_id") if privacy_path.is_file() else record.get("run_id")
    if record.get("run_id") != current:  # kept in an earlier run in this folder: not this run's model
        return None
    calibration = record.get("calibration")
    if not isinstance(calibration, dict):
        raise CheckpointError(f"{record_path} holds no calibration record")
    try:
        calibrator = Calibrator.from_dict(calibration)
    except FedChurnError as exc:
        raise CheckpointError(f"{record_path}: {exc}") from None
    model = build_model(config.model, input_dim=input_dim)
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{model_path} cannot be read: {exc}") from None
    check_state(model.state_dict(), state, what=f"kept model {model_path}")
    model.load_state_dict(state)
    round_value = record.get("round")
    return model, calibrator, int(round_value) if isinstance(round_value, int) else -1


def final_model(run: Path, home: Path, config: FedChurnConfig, feature_names: tuple[str, ...]) -> ChurnModel:
    """The run's final encoder with the institution's last head (runs where the institution kept no model)."""
    head_path = run / GLOBAL_HEAD_FILE if config.transfer.mode == "fedavg" else home / HEAD_FILE
    _required_file(head_path, "churn head", "the institution never trained in this run")
    encoder = load_encoder_checkpoint(
        _required_file(run / ENCODER_FILE, "encoder", "the run did not finish"),
        model=config.model,
        feature_names=feature_names,
    )
    model = build_model(config.model, input_dim=len(feature_names))
    load_encoder_arrays(model, encoder)
    try:
        head = torch.load(head_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{head_path} cannot be read: {exc}") from None
    load_head_state(model, head, what=f"head {head_path}")
    return model


def _labelled_metrics(
    labels: np.ndarray | None, probabilities: np.ndarray
) -> tuple[dict[str, float] | None, list[dict[str, float]]]:
    """AUC, Brier, ECE, mean probability and churn rate (and the calibration table) when the input has labels."""
    if labels is None or len(labels) == 0:
        return None, []
    metrics = {
        "auc": roc_auc(labels, probabilities),
        "brier": brier_score(labels, probabilities),
        "ece": expected_calibration_error(labels, probabilities),
        "mean_probability": float(np.mean(probabilities)),
        "churn_rate": float(np.mean(labels)),
        "rows": float(len(labels)),
    }
    return metrics, calibration_table(labels, probabilities)


def _load_json(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot be read: {exc}", path=str(path)) from None
    if not isinstance(value, dict):
        raise DataError("must hold a JSON object", path=str(path))
    return value
