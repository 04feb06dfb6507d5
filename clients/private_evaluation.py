"""A bank's evaluation under its privacy guarantee: what it releases, what it keeps, and when it says nothing.

On an evaluate request the bank, in this order:

1. decides whether a release is allowed at all — evaluation ``off``, nothing trained yet, no new round trained
   since its last release (at most one release per trained round, whatever the server asks), not a release
   round (``every_rounds``), or a release that would take its ε past its budget: then it withholds
   (:class:`EvaluationWithheld`, reason code ``evaluation-withheld``) and nothing about its rows leaves;
2. charges the release to its accountant and ledger *before* computing anything (a crash afterwards can only
   over-count, never release unaccounted);
3. scores its training, validation and test rows, releases the three 2×B score histograms with Gaussian noise
   from the OS CSPRNG (one Gaussian mechanism: the row sets are disjoint, so one customer changes one cell of one
   of them: the training rows cost nothing beyond the release already charged). The bins are centred on the
   model's logit for the all-zero (reference) input: a function of the model only, never of the rows;
4. from the released histograms only (post-processing): fits Platt scaling on training + validation (validation
   alone, or validation + test, when that is too noisy) and fixed risk-decile thresholds, and scores the model by
   its validation histogram; it keeps encoder + head + calibrator of its best round by that score
   (``kept-model.pt`` / ``kept-model.json`` in its state folder), which ``fedchurn predict`` uses;
5. reports metrics of the released test histogram, for this round's model and for the model it keeps, and per
   histogram bin of that release the calibrated probability, noisy churn rate and noisy row count (a reliability
   diagram; post-processing like the rest).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import RecordDict

from fedchurn.clients.budget import bank_signer, lifetime_cap, lifetime_history
from fedchurn.clients.calibration import Calibrator, decile_thresholds, fit_platt_histogram
from fedchurn.clients.evaluation import predict_logits
from fedchurn.clients.institution_identity import Institution
from fedchurn.clients.private_metrics import (
    BinSpec,
    EvaluationSettings,
    histogram_auc,
    histogram_metrics,
    release_histogram,
    reliability_bins,
    score_histogram,
    secure_rng,
)
from fedchurn.clients.state import InstitutionState, StateStore
from fedchurn.shared.decline import EVALUATION_WITHHELD, Decline
from fedchurn.shared.errors import FedChurnError
from fedchurn.shared.ledger import InstitutionLedger
from fedchurn.shared.model import ChurnModel
from fedchurn.shared.privacy_accounting import epsilon_of
from fedchurn.shared.provenance import library_versions
from fedchurn.shared.wire import CALIBRATION_FAMILIES

if TYPE_CHECKING:
    from fedchurn.clients.prepared_institution import PreparedInstitution

logger = logging.getLogger(__name__)

__all__ = [
    "KEPT_MODEL_FILE",
    "KEPT_RECORD_FILE",
    "EvaluationWithheld",
    "calibrator_from_releases",
    "exact_histograms",
    "private_evaluation",
    "reference_logit",
]

EVALUATION_FILE = "evaluation.json"  # releases so far in this run and the round of the kept model
KEPT_MODEL_FILE = "kept-model.pt"  # the whole model (encoder + head) of the bank's best round
KEPT_RECORD_FILE = "kept-model.json"  # its round, DP validation score, calibrator and released test metrics


class EvaluationWithheld(FedChurnError):
    """No evaluation statistics leave the bank this time; ``decline`` carries only budget figures."""

    def __init__(self, institution: str, why: str, decline: Decline) -> None:
        self.decline = decline
        super().__init__(f"{institution} withholds evaluation: {why}")


@dataclass
class _Releases:
    """What the bank remembers about its releases in one run (``evaluation.json``)."""

    run_id: int | str
    releases: int = 0
    released_after_rounds: int = 0  # rounds_trained at the last release
    kept: dict[str, Any] | None = None  # round, val_auc and released test metrics of the kept model

    @classmethod
    def load(cls, folder: Path, run_id: int | str) -> _Releases:
        path = folder / EVALUATION_FILE
        if not path.is_file():
            return cls(run_id=run_id)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FedChurnError(f"{path} is unreadable ({exc}): move it away to start evaluation afresh") from None
        if values.get("run_id") != run_id:
            return cls(run_id=run_id)
        return cls(
            run_id=run_id,
            releases=int(values.get("releases", 0)),
            released_after_rounds=int(values.get("released_after_rounds", 0)),
            kept=values.get("kept"),
        )

    def save(self, folder: Path) -> None:
        record = {
            "run_id": self.run_id,
            "releases": self.releases,
            "released_after_rounds": self.released_after_rounds,
            "kept": self.kept,
        }
        _atomic_write(folder / EVALUATION_FILE, json.dumps(record, indent=2, allow_nan=False))


def private_evaluation(
    institution: Institution,
    settings: EvaluationSettings,
    *,
    model: ChurnModel,
    data: PreparedInstitution,
    state: InstitutionState,
    store: StateStore,
    context_state: RecordDict,
    server_round: int,
) -> dict[str, float]:
    """Release this round's evaluation (see the module docstring) or raise :class:`EvaluationWithheld`."""
    config = institution.config
    folder = institution.state_dir
    releases = _Releases.load(folder, state.run_id)
    privacy = config.privacy
    max_epsilon = lifetime_cap(institution)
    # The bank's lifetime history on these rows (every run, training and releases alike): what its cap bounds.
    lifetime = lifetime_history(institution, fingerprint=data.fingerprint)
    after = lifetime.with_steps(noise_multiplier=settings.noise_multiplier, sample_rate=1.0, steps=1)
    spent = epsilon_of(lifetime, delta=privacy.delta) if privacy.enabled else math.inf
    projected = epsilon_of(after, delta=privacy.delta) if privacy.enabled else math.inf

    def withhold(why: str) -> EvaluationWithheld:
        logger.info("%s round %d: evaluation withheld: %s", institution.name, server_round, why)
        decline = Decline(
            reason=EVALUATION_WITHHELD,
            epsilon=spent,
            projected_epsilon=projected,
            max_epsilon=max_epsilon if max_epsilon is not None else math.inf,
            delta=privacy.delta if privacy.enabled else 0.0,
            rounds_trained=state.rounds_trained,
        )
        return EvaluationWithheld(institution.name, why, decline)

    trained = state.rounds_trained
    if not settings.enabled:
        raise withhold("evaluation is off")
    if trained == 0:
        raise withhold("no round trained yet")
    if trained <= releases.released_after_rounds:
        raise withhold(f"already released after round {trained} of its training (one release per trained round)")
    # Release rounds: the run's last, any round after the bank stopped training (it missed a round: its model is
    # final), and every k-th trained round. A server that lies about rounds still gets one release per trained round.
    last = trained >= config.rounds or server_round > trained
    every = settings.every_rounds
    if not last and (every == 0 or trained % every != 0):
        raise withhold(f"not a release round (every_rounds = {every}, {trained} rounds trained)")
    if max_epsilon is not None and projected > max_epsilon:
        raise withhold(f"a release would take ε from {spent:.4g} to {projected:.4g}, above the budget {max_epsilon:g}")

    # Charge first: from here on the release is accounted even if anything below fails.
    if privacy.enabled:
        # this run's history (privacy.json)
        state.accountant = state.accountant.with_steps(
            noise_multiplier=settings.noise_multiplier, sample_rate=1.0, steps=1
        )
        state.last_epsilon = projected
        store.save(state, context_state)
        _ledger_record(
            institution, state, settings, server_round=server_round, epsilon=projected, fingerprint=data.fingerprint
        )
    releases.releases += 1
    releases.released_after_rounds = trained
    releases.save(folder)

    spec = settings.spec
    rng = secure_rng()
    exact, offset = exact_histograms(model, data, spec)
    released = release_histogram(exact, noise_multiplier=settings.noise_multiplier, rng=rng)
    del exact  # nothing below reads the rows or their exact counts
    val_hist, test_hist, train_hist = released[:2], released[2:4], released[4:]

    centred, calibrated_on = calibrator_from_releases(val_hist, test_hist, settings, train_hist=train_hist)
    calibrator = centred.moved(offset)  # in the model's own logit space, as fedchurn predict scores
    val_auc = histogram_auc(val_hist)
    test_probabilities = centred.probabilities(spec.centres)
    test = histogram_metrics(test_hist, test_probabilities)
    # the reliability diagram of this release: from the released test histogram and the calibrator only
    per_bin = {
        f"{family}-{j}": float(value)
        for family, values in zip(CALIBRATION_FAMILIES, reliability_bins(test_hist, test_probabilities), strict=True)
        for j, value in enumerate(values)
    }
    current = {
        "round": int(server_round),
        "val_auc": val_auc,
        "auc": test["auc"],
        "brier": test["brier"],
        "ece": test["ece"],
        "mean_probability": test["mean_probability"],
        "churn_rate": test["churn_rate"],
    }
    # The first release is kept whatever its score (a noisy histogram can leave a class empty: AUC undefined);
    # later ones replace it only with a better defined score.
    kept_auc = releases.kept.get("val_auc") if releases.kept else None
    better = math.isfinite(val_auc) and (kept_auc is None or val_auc > kept_auc)
    if releases.kept is None or better:
        _keep(folder, model, calibrator, calibrated_on, current, settings, run_id=state.run_id, offset=offset)
        releases.kept = {k: (v if math.isfinite(v) else None) for k, v in current.items()}
        releases.save(folder)
    kept = releases.kept or {}

    def number(value: Any) -> float:
        return float(value) if value is not None else math.nan

    return {
        "num-examples": max(1.0, float(round(test["count"]))),
        "auc": test["auc"],
        "pr-auc": test["pr_auc"],
        "brier": test["brier"],
        "ece": test["ece"],
        "loss": test["log_loss"],
        "mean-probability": test["mean_probability"],
        "churn-rate": test["churn_rate"],
        "val-auc": val_auc,
        "kept-round": number(kept.get("round")),
        "kept-auc": number(kept.get("auc")),
        "kept-ece": number(kept.get("ece")),
        "epsilon": state.last_epsilon if privacy.enabled else math.inf,
        "delta": privacy.delta if privacy.enabled else 0.0,
        # the exact training-set size only where the bank's policy releases it (0.0: withheld)
        "n-train": float(len(data.y_train)) if institution.policy.report_dataset_size else 0.0,
        "n-test": max(0.0, float(round(test["count"]))),
        **per_bin,
    }


def calibrator_from_releases(
    val_hist: np.ndarray,
    test_hist: np.ndarray,
    settings: EvaluationSettings,
    *,
    train_hist: np.ndarray | None = None,
) -> tuple[Calibrator, str]:
    """Platt scaling and decile thresholds from released histograms (post-processing), and which ones were used.

    With a released training-row histogram, training + validation pooled come first (several times the rows of
    validation alone: the noise, σ_e per cell whatever the rows, weighs that much less; the test release stays out
    of the fit, so the test metrics stay out-of-sample). Then validation alone when each class stands clear of the
    noise (its noisy count above σ_e·√B, the std of that sum); then validation + test pooled (the reported test
    metrics are then in-sample for the calibrator's two numbers); otherwise none: the model's own probabilities.
    Decile thresholds come from every release pooled (a score distribution needs no labels; more rows steady it).
    """
    spec = settings.spec
    floor = settings.noise_multiplier * math.sqrt(spec.bins)
    pooled = val_hist + test_hist
    everything = pooled if train_hist is None else pooled + train_hist
    try:
        thresholds = decile_thresholds(everything, spec.edges)
    except FedChurnError:
        thresholds = tuple(np.linspace(-0.8, 0.8, 9) * spec.logit_range)
    # Two releases summed: the noise std of a class total grows by √2.
    candidates: list[tuple[str, np.ndarray, float]] = []
    if train_hist is not None:
        candidates.append(("training+validation", train_hist + val_hist, floor * math.sqrt(2.0)))
    candidates += [("validation", val_hist, floor), ("validation+test", pooled, floor * math.sqrt(2.0))]
    for source, hist, floor_here in candidates:
        totals = hist.sum(axis=1)
        if totals.min() <= floor_here:
            continue
        try:
            a, b = fit_platt_histogram(
                hist, spec.centres, noise_multiplier=settings.noise_multiplier * floor_here / floor
            )
            low, high = float(spec.centres[0]), float(spec.centres[-1])
            return Calibrator(a=a, b=b, thresholds=thresholds, low=low, high=high), source
        except FedChurnError as exc:
            logger.warning("calibration on %s skipped: %s", source, exc)
    logger.warning("calibration skipped: the released histograms are too noisy to fit (a class below σ_e·√bins)")
    return Calibrator(a=1.0, b=0.0, thresholds=thresholds), "none"


def exact_histograms(model: ChurnModel, data: PreparedInstitution, spec: BinSpec) -> tuple[np.ndarray, float]:
    """The exact (6, B) counts to release, validation, test and training rows in that order, and the bins' offset.

    Each customer row is in one set, so it is counted in exactly one cell: L2 sensitivity 1 for the whole array.
    The bins follow the model, never the rows: centred on the model's logit for the reference customer.
    """
    offset = reference_logit(model, input_dim=data.x_val.shape[1])
    parts = [
        score_histogram(predict_logits(model, x).double().numpy() - offset, y, spec)
        for x, y in ((data.x_val, data.y_val), (data.x_test, data.y_test), (data.x_train, data.y_train))
    ]
    return np.concatenate(parts), offset


def reference_logit(model: ChurnModel, *, input_dim: int) -> float:
    """The model's logit for the all-zero input (every numeric feature at the midpoint of its declared public
    bounds, no category): a function of the model alone, so a histogram grid centred on it reads no row."""
    logit = float(predict_logits(model, np.zeros((1, input_dim), dtype=np.float32)).double().numpy()[0])
    return logit if math.isfinite(logit) else 0.0


def _keep(
    folder: Path,
    model: ChurnModel,
    calibrator: Calibrator,
    calibrated_on: str,
    metrics: dict[str, Any],
    settings: EvaluationSettings,
    *,
    run_id: int | str,
    offset: float,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    tmp = folder / (KEPT_MODEL_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / KEPT_MODEL_FILE)

    def finite(value: Any) -> Any:
        return value if not isinstance(value, float) or math.isfinite(value) else None

    record = {
        "run_id": run_id,
        "round": metrics["round"],
        "selected_by": "AUC of the DP-released validation histogram",
        "validation_auc": finite(metrics["val_auc"]),
        "released_test_metrics": {k: finite(v) for k, v in metrics.items() if k not in ("round", "val_auc")},
        "calibration": calibrator.to_dict() | {"fitted_on": f"DP-released {calibrated_on} histogram"},
        "histogram": {"bins": settings.spec.bins, "logit_range": settings.spec.logit_range, "logit_offset": offset},
    }
    _atomic_write(folder / KEPT_RECORD_FILE, json.dumps(record, indent=2, allow_nan=False))
    logger.info("kept the model of round %s (DP validation AUC %.3f)", metrics["round"], metrics["val_auc"])


def _ledger_record(
    institution: Institution,
    state: InstitutionState,
    settings: EvaluationSettings,
    *,
    server_round: int,
    epsilon: float,
    fingerprint: str,
) -> None:
    privacy = institution.config.privacy
    record: dict[str, Any] = {
        "kind": "evaluate",
        "institution": institution.name,
        "run_id": state.run_id,
        "round": int(server_round),
        "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mechanism": "Gaussian (noisy score histograms of training, validation and test rows)",
        "unit": "one customer row (add/remove one row)",
        "noise_multiplier": float(settings.noise_multiplier),
        "sample_rate": 1.0,
        "steps": 1,
        "sensitivity": 1.0,
        "bins": settings.spec.bins,
        "delta": float(privacy.delta),
        "accountant": state.accountant.accountant,
        "dataset_fingerprint": fingerprint,
        "cumulative_steps": state.accountant.total_steps,
        "rounds_trained": state.rounds_trained,
        "epsilon": float(epsilon),
        "epsilon_scope": "lifetime: every ledger record on rows with this dataset_fingerprint",
        "max_epsilon": lifetime_cap(institution),
        "versions": library_versions(),
    }
    InstitutionLedger.in_folder(institution.state_dir).append(record, sign=bank_signer(institution).sign)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
