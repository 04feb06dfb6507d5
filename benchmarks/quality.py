"""Would a bank act on the model? Per institution, at one target ε: the best federated mode, the bank's own DP model
alone, its own non-private logistic regression and gradient-boosted trees, and the calibration of its DP model.

    python -m benchmarks.quality deploy/configs/bankchurners.yaml --set data.csv_path=/path/BankChurners.csv \\
        --seeds 3 --comparison DIR/comparison.json

In process, per seed and institution (the same splits as ``fedchurn compare``):

- ``own DP``: the bank's DP model alone (its own plan for the target ε, ``training.plan``), test AUC;
- ``logreg`` / ``trees``: scikit-learn on the bank's own rows, NOT private, test AUC;
- calibration of the own-DP model exactly as a bank calibrates (clients/private_evaluation.py): the validation and
  test score histograms released with the run's evaluation noise σ_e, Platt scaling and decile thresholds fitted
  on the releases only; then, on the exact test rows, ECE (10 equal-width bins), the mean calibrated probability
  and the observed churn rate; ``ECE floor``: the ECE the same probabilities would show on a test set of this
  size if they were perfectly calibrated (labels drawn from them, mean of 50 draws): the measurement's own noise.
- ``best federated``: the best mean test AUC among the federated modes of a ``fedchurn compare`` run over the same
  seeds (``--comparison``), read from its comparison.json; absent without it.

Prints one table (mean ± 95 % CI half-width over seeds) with its conditions, and each "done when" criterion.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedchurn.clients.evaluation import predict_logits
from fedchurn.clients.metrics import expected_calibration_error, roc_auc
from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.private_evaluation import calibrator_from_releases, exact_histograms
from fedchurn.clients.private_metrics import evaluation_settings, release_histogram, score_histogram
from fedchurn.comparison.baselines import run_sklearn, train_local_model
from fedchurn.comparison.report import mean_ci95
from fedchurn.comparison.runner import at_target_epsilon
from fedchurn.shared.config import FedChurnConfig, apply_overrides, load_config, parse_override
from fedchurn.shared.institution_rows import institution_names
from fedchurn.shared.policy import CONSERVATIVE_POLICY
from fedchurn.shared.transfer import FEDERATED_MODES

FLOOR_DRAWS = 50


def bank_quality(config: FedChurnConfig, name: str, *, rng: np.random.Generator, centred: bool) -> dict[str, float]:
    """One institution, one seed: own-DP AUC and the calibration of its DP-calibrated probabilities."""
    data = prepare_institution(config, name)
    model, epsilon = train_local_model(config, data)
    settings = evaluation_settings(config, policy=CONSERVATIVE_POLICY)
    if centred:  # as the bank does (clients/private_evaluation.py)
        exact, offset = exact_histograms(model, data, settings.spec)
    else:  # before: bins at 0
        exact, offset = _uncentred(model, data, settings.spec), 0.0
    released = release_histogram(exact, noise_multiplier=settings.noise_multiplier, rng=rng)
    calibrator, _ = calibrator_from_releases(
        released[:2], released[2:4], settings, train_hist=released[4:] if centred else None
    )
    test_logits = predict_logits(model, data.x_test).double().numpy()
    probabilities = calibrator.moved(offset).probabilities(test_logits)
    y = data.y_test.astype(np.int64)
    floor = [
        expected_calibration_error((rng.random(len(y)) < probabilities).astype(np.int64), probabilities)
        for _ in range(FLOOR_DRAWS)
    ]
    return {
        "own_dp": roc_auc(y, test_logits),
        "epsilon": epsilon,
        "ece": expected_calibration_error(y, probabilities),
        "ece_floor": float(np.mean(floor)),
        "mean_probability": float(np.mean(probabilities)),
        "churn_rate": float(np.mean(y)),
        "n_val": float(len(data.y_val)),
        "n_test": float(len(y)),
    }


def _uncentred(model: Any, data: Any, spec: Any) -> np.ndarray:
    parts = [
        score_histogram(predict_logits(model, x).double().numpy(), y, spec)
        for x, y in ((data.x_val, data.y_val), (data.x_test, data.y_test), (data.x_train, data.y_train))
    ]
    return np.concatenate(parts)


def best_federated(path: Path | None) -> dict[str, tuple[str, float | None, float | None]]:
    """Per institution: (mode, mean AUC, CI) of the best federated mode in a comparison.json."""
    if path is None:
        return {}
    comparison = json.loads(path.read_text(encoding="utf-8"))
    best: dict[str, tuple[str, float | None, float | None]] = {}
    for name, by_mode in comparison["institutions"].items():
        entries = [(m, e) for m, e in by_mode.items() if m in FEDERATED_MODES and e.get("auc") is not None]
        if entries:
            mode, entry = max(entries, key=lambda item: item[1]["auc"])
            best[name] = (mode, entry["auc"], entry.get("auc_ci95"))
    return best


def _fmt(values: Sequence[float]) -> str:
    mean, ci = mean_ci95(values)
    if mean is None:
        return "—"
    return f"{mean:.3f}" + (f" ± {ci:.3f}" if ci is not None else "")


def measure(config: FedChurnConfig, seeds: Sequence[int], *, after: bool = True) -> dict[str, dict[str, list[float]]]:
    names = institution_names(config.data, seed=config.seed)
    rows: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for seed in seeds:
        seeded = dataclasses.replace(config, seed=seed)
        rng = np.random.default_rng(seed)
        baselines = {kind: run_sklearn(seeded, names, kind=kind) for kind in ("logreg", "hgb")}
        for name in names:
            values = bank_quality(seeded, name, rng=rng, centred=after)
            values["logreg"] = baselines["logreg"][name]["auc"]
            values["trees"] = baselines["hgb"][name]["auc"]
            for key, value in values.items():
                rows[name].setdefault(key, []).append(float(value))
    return rows


def report(
    rows: dict[str, dict[str, list[float]]],
    federated: dict[str, tuple[str, float | None, float | None]],
    *,
    config: FedChurnConfig,
    seeds: Sequence[int],
) -> str:
    settings = evaluation_settings(config, policy=CONSERVATIVE_POLICY)
    lines = [
        f"Target ε = {config.privacy.target_epsilon:g} per institution (δ = {config.privacy.delta:g}), "
        f"{config.rounds} rounds, training.plan = {config.training.plan}, model {config.model.encoder_hidden} -> "
        f"{config.model.embedding_dim} -> head {config.model.head_hidden}; seeds {list(seeds)}; "
        "test AUC mean ± 95 % CI; "
        f"calibration: Platt on DP histograms (σ_e = {settings.noise_multiplier:g}, {settings.spec.bins} bins), "
        "ECE and mean probability on the exact test rows of the own-DP model",
        "",
        "| institution | n val/test | best federated | own DP | own logreg | own trees | ECE (floor) | "
        "mean prob vs churn |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts: dict[str, list[bool]] = {"fed>=own_dp": [], "fed>=logreg": [], "ece<=0.03": [], "mean_within_20%": []}
    fed_means, tree_means = [], []
    for name, values in rows.items():
        mode, fed_auc, fed_ci = federated.get(name, ("—", None, None))
        fed = "—" if fed_auc is None else f"{fed_auc:.3f}" + (f" ± {fed_ci:.3f}" if fed_ci else "") + f" ({mode})"
        own, logreg, trees = (float(np.mean(values[k])) for k in ("own_dp", "logreg", "trees"))
        ece, mean_p, rate = (float(np.mean(values[k])) for k in ("ece", "mean_probability", "churn_rate"))
        lines.append(
            f"| {name} | {int(values['n_val'][0])}/{int(values['n_test'][0])} | {fed} | {_fmt(values['own_dp'])} | "
            f"{_fmt(values['logreg'])} | {_fmt(values['trees'])} | {ece:.3f} ({np.mean(values['ece_floor']):.3f}) | "
            f"{mean_p:.3f} vs {rate:.3f} |"
        )
        if fed_auc is not None:
            verdicts["fed>=own_dp"].append(fed_auc >= own)
            verdicts["fed>=logreg"].append(fed_auc >= logreg)
            fed_means.append(fed_auc)
        tree_means.append(trees)
        verdicts["ece<=0.03"].append(ece <= 0.03)
        verdicts["mean_within_20%"].append(abs(mean_p - rate) <= 0.2 * rate)
    lines.append("")
    for key, flags in verdicts.items():
        lines.append(f"{key}: {sum(flags)}/{len(flags)} institutions" if flags else f"{key}: not measured")
    if fed_means:
        gap = float(np.mean(tree_means) - np.mean(fed_means))
        lines.append(f"mean AUC gap, own trees − best federated: {gap:.3f} (done when ≤ 0.03)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target-epsilon", type=float, default=3.0)
    parser.add_argument("--comparison", type=Path, default=None, help="comparison.json of fedchurn compare")
    parser.add_argument(
        "--calibration",
        choices=("bank", "before"),
        default="bank",
        help="bank: as clients/private_evaluation.py calibrates; before: bins at 0 and validation-first Platt "
        "(the earlier behaviour, for comparison; the Platt fit itself is today's)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = load_config(args.config)
    config = apply_overrides(config, dict(parse_override(text) for text in args.set))
    config = at_target_epsilon(config, args.target_epsilon)
    seeds = tuple(config.seed + i for i in range(args.seeds))
    rows = measure(config, seeds, after=args.calibration == "bank")
    print(report(rows, best_federated(args.comparison), config=config, seeds=seeds))
    return rows


if __name__ == "__main__":
    main()
