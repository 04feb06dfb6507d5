"""The comparison's numbers and pictures: mean and 95 % confidence interval over seeds, a table, a chart."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CHANCE_AUC = 0.5


def mean_ci95(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and the half-width of its two-sided 95 % Student-t confidence interval (None with one value)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    mean = statistics.fmean(finite)
    if len(finite) < 2:
        return mean, None
    from scipy.stats import t

    half = float(t.ppf(0.975, len(finite) - 1)) * statistics.stdev(finite) / math.sqrt(len(finite))
    return mean, half


def summarise(
    runs: Mapping[str, Mapping[str, Sequence[Mapping[str, float | None]]]],
    *,
    modes: Sequence[str],
    labels: Mapping[str, str],
    private: Mapping[str, bool],
    target_epsilon: float | None,
    delta: float,
    seeds: Sequence[int],
) -> dict[str, Any]:
    """Per institution and mode: AUC and PR-AUC mean ± CI over seeds, every seed's AUC, the largest ε spent."""
    institutions: dict[str, dict[str, dict[str, Any]]] = {}
    for name, by_mode in runs.items():
        institutions[name] = {}
        for mode in modes:
            per_seed = list(by_mode.get(mode, []))
            if not per_seed:
                continue
            aucs = [r["auc"] for r in per_seed]
            auc, auc_ci = mean_ci95([a for a in aucs if a is not None])
            pr_auc, pr_auc_ci = mean_ci95([r["pr_auc"] for r in per_seed if r["pr_auc"] is not None])
            epsilons = [r["epsilon"] for r in per_seed if r["epsilon"] is not None]
            institutions[name][mode] = {
                "auc": auc,
                "auc_ci95": auc_ci,
                "auc_per_seed": aucs,
                "pr_auc": pr_auc,
                "pr_auc_ci95": pr_auc_ci,
                "epsilon": max(epsilons) if epsilons and private[mode] else None,
                "runs": len(per_seed),
            }
    return {
        "institutions": institutions,
        "modes": list(modes),
        "mode_labels": dict(labels),
        "private": dict(private),
        "target_epsilon": target_epsilon,
        "delta": delta,
        "seeds": list(seeds),
        "notes": {
            "auc": "test AUC, mean over seeds; auc_ci95: half-width of the 95% Student-t interval of that mean",
            "epsilon": "largest ε per customer row at delta spent over the run by any seed; null: not private",
            "centralized": "every institution's training rows pooled, NOT private: not a deployable option",
            "logreg/hgb": "each institution's own rows, scikit-learn, NOT private",
            "local": "each institution alone, random initial encoder, the same DP and target ε as the federation",
        },
    }


def _cell(entry: Mapping[str, Any] | None) -> str:
    if entry is None or entry.get("auc") is None:
        return "—"
    ci = entry.get("auc_ci95")
    return f"{entry['auc']:.3f} ± {ci:.3f}" if ci is not None else f"{entry['auc']:.3f}"


def _epsilon_text(comparison: Mapping[str, Any], mode: str) -> str:
    if not comparison["private"].get(mode):
        return "not private"
    spent = [
        by_mode[mode]["epsilon"]
        for by_mode in comparison["institutions"].values()
        if mode in by_mode and by_mode[mode]["epsilon"] is not None
    ]
    return f"ε ≤ {max(spent):.2f}" if spent else "ε n/a"


def institution_means(comparison: Mapping[str, Any], mode: str) -> float | None:
    values = [
        by_mode[mode]["auc"]
        for by_mode in comparison["institutions"].values()
        if mode in by_mode and by_mode[mode]["auc"] is not None
    ]
    return statistics.fmean(values) if values else None


def markdown_table(comparison: Mapping[str, Any]) -> str:
    """One row per institution (and their mean), one column per mode: "AUC mean ± 95 % CI"."""
    modes = comparison["modes"]
    sizes = comparison.get("sizes", {})
    header = "| institution | n_train | n_test | " + " | ".join(comparison["mode_labels"][m] for m in modes) + " |"
    lines = [header, "|" + "---|" * (len(modes) + 3)]
    lines.append("| ε per bank | | | " + " | ".join(_epsilon_text(comparison, m) for m in modes) + " |")
    for name, by_mode in comparison["institutions"].items():
        size = sizes.get(name, {})
        cells = " | ".join(_cell(by_mode.get(m)) for m in modes)
        lines.append(f"| {name} | {size.get('n_train', '')} | {size.get('n_test', '')} | {cells} |")
    means = []
    for mode in modes:
        value = institution_means(comparison, mode)
        means.append("—" if value is None else f"{value:.3f}")
    lines.append("| mean over institutions | | | " + " | ".join(means) + " |")
    seeds = comparison["seeds"]
    lines.append("")
    lines.append(
        f"Test AUC, mean ± half-width of the 95% confidence interval over {len(seeds)} seed(s) "
        f"({', '.join(str(s) for s in seeds)}); each seed draws new splits, weights, sampling and noise. "
        f"Private modes: target ε = {comparison['target_epsilon']} per customer row at δ = {comparison['delta']:g}, "
        'over the whole run, at every institution. "Not private" columns use no differential privacy: the '
        "pooled network sees every institution's rows; logistic regression and gradient-boosted trees see "
        "the institution's own rows."
    )
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: Mapping[str, Any], path: Path) -> None:
    """One panel per institution: a dot per mode (mean, 95 % CI bar, each seed), chance level, ε in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(comparison["institutions"])
    modes = comparison["modes"]
    labels = [
        f"{comparison['mode_labels'][m]}\n[{_epsilon_text(comparison, m)}]"
        if comparison["private"].get(m)
        else comparison["mode_labels"][m]  # already says "not private"
        for m in modes
    ]
    columns = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns + 2.4, 0.42 * len(modes) * rows + 1.2 * rows), sharey=True, squeeze=False
    )
    aucs = [
        a
        for by_mode in comparison["institutions"].values()
        for entry in by_mode.values()
        for a in entry["auc_per_seed"]
        if a is not None
    ]
    low = min([CHANCE_AUC, *aucs]) - 0.03
    ys = list(range(len(modes)))
    sizes = comparison.get("sizes", {})
    for index, ax in enumerate(axes.flat):
        if index >= len(names):
            ax.axis("off")
            continue
        name = names[index]
        by_mode = comparison["institutions"][name]
        for y, mode in zip(ys, modes, strict=True):
            entry = by_mode.get(mode)
            if entry is None or entry["auc"] is None:
                continue
            colour = "tab:blue" if comparison["private"].get(mode) else "tab:gray"
            seeds = [a for a in entry["auc_per_seed"] if a is not None]
            ax.scatter(seeds, [y] * len(seeds), s=10, color=colour, alpha=0.4, zorder=2)
            ax.errorbar(entry["auc"], y, xerr=entry["auc_ci95"] or 0.0, fmt="o", color=colour, capsize=3, zorder=3)
        ax.axvline(CHANCE_AUC, color="tab:red", linestyle="--", linewidth=1)
        ax.set_xlim(low, 1.0)
        size = sizes.get(name, {})
        title = f"{name} (train {size.get('n_train', '?')}, test {size.get('n_test', '?')})"
        ax.set_title(title.replace("$", r"\$"), fontsize=9)  # "$40K - $60K" is a name, not mathematics
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel("test AUC (dashed: chance, 0.5)", fontsize=8)
    axes.flat[0].invert_yaxis()  # shared by every panel: the first mode on top
    fig.suptitle(
        f"Test AUC per institution, mean and 95% CI over {len(comparison['seeds'])} seed(s); "
        f"blue: private at target ε = {comparison['target_epsilon']}; grey: not private",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
