"""`fedchurn compare`: every transfer mode on identical splits and seeds, side by side.

Splits depend only on (seed, institution name), and every mode starts from the same seeded weights (plus
``model.encoder_checkpoint`` for the federated modes), so the differences are the modes'. Writes
``comparison.json``, ``comparison.md`` and ``comparison.png`` (AUC per institution per mode), and each federated
mode's full run under ``DIR/MODE/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.config import FedChurnConfig, dump_config
from shared.data import institution_names
from shared.errors import ConfigError
from shared.transfer import ALL_MODES, MODE_LABELS, REFERENCE_MODES

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"
KEPT_METRICS = ("auc", "pr_auc", "epsilon")


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in ALL_MODES]
    if not modes or unknown:
        raise ConfigError("--modes", text, f"must list modes among {', '.join(ALL_MODES)}")
    if len(set(modes)) != len(modes):
        raise ConfigError("--modes", text, "lists a mode twice")
    return modes


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def run_comparison(
    config: FedChurnConfig,
    *,
    modes: Sequence[str],
    output_dir: str | Path,
    ray_address: str | None = None,
    verbose: bool = False,
    on_mode: Any = None,
) -> dict[str, Any]:
    """Run each mode; return and write ``{"institutions": {NAME: {MODE: {auc, pr_auc, epsilon}}}, ...}``."""
    from shared.baselines import run_centralized, run_local
    from shared.simulation import plan_simulation, run_simulation

    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = institution_names(config.data, seed=config.seed)
    table: dict[str, dict[str, dict[str, float | None]]] = {name: {} for name in names}
    sizes: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for mode in modes:
        started = time.perf_counter()
        if mode in REFERENCE_MODES:
            results = run_local(config, names) if mode == "local" else run_centralized(config, names)
        else:
            mode_config = dataclasses.replace(
                config,
                transfer=dataclasses.replace(config.transfer, mode=mode),  # type: ignore[arg-type]
                output_dir=str(out / mode),
            )
            summary = run_simulation(plan_simulation(mode_config), ray_address=ray_address, verbose=verbose)
            results = summary["institutions"]
        seconds[mode] = round(time.perf_counter() - started, 2)
        for name in names:
            if name in results:
                table[name][mode] = {key: _number(results[name].get(key)) for key in KEPT_METRICS}
                sizes.setdefault(name, int(results[name].get("n_train", 0)))
        if on_mode is not None:
            on_mode(mode, seconds[mode])
    comparison = {
        "institutions": table,
        "modes": list(modes),
        "mode_labels": {m: MODE_LABELS[m] for m in modes},
        "n_train": sizes,
        "seconds": seconds,
        "seed": config.seed,
        "rounds": config.rounds,
        "encoder_checkpoint": config.model.encoder_checkpoint,
        "notes": {
            "epsilon": "per customer row at privacy.delta, cumulative over the run; null: no DP",
            "centralized": "pooled rows, NOT private: a research upper bound only",
            "local": "each institution alone, random initial encoder, same DP; the encoder checkpoint is not used",
        },
    }
    (out / COMPARISON_JSON).write_text(json.dumps(comparison, indent=2), encoding="utf-8")
    (out / COMPARISON_MD).write_text(markdown_table(comparison), encoding="utf-8")
    (out / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    plot_comparison(comparison, out / COMPARISON_PNG)
    return comparison


def markdown_table(comparison: dict[str, Any]) -> str:
    """One row per institution, one column per mode: "AUC (ε …)"."""
    modes = comparison["modes"]
    header = "| institution | n_train | " + " | ".join(comparison["mode_labels"][m] for m in modes) + " |"
    lines = [header, "|" + "---|" * (len(modes) + 2)]
    for name, by_mode in comparison["institutions"].items():
        cells = []
        for mode in modes:
            m = by_mode.get(mode)
            if m is None or m["auc"] is None:
                cells.append("—")
                continue
            eps = "ε n/a (no DP)" if m["epsilon"] is None else f"ε {m['epsilon']:.2f}"
            cells.append(f"{m['auc']:.3f} ({eps})")
        lines.append(f"| {name} | {comparison['n_train'].get(name, '')} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Test AUC per institution; ε per customer row, cumulative over the run. Centralized pools the rows")
    lines.append("without differential privacy: a research upper bound only.")
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: dict[str, Any], path: Path) -> None:
    """Grouped bars: AUC per institution (x) per mode (colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(comparison["institutions"])
    modes = comparison["modes"]
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 2), 4.5))
    for i, mode in enumerate(modes):
        values = [(comparison["institutions"][n].get(mode) or {}).get("auc") for n in names]
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=comparison["mode_labels"][mode])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n(n={comparison['n_train'].get(n, '?')})" for n in names], fontsize=8)
    ax.set_ylabel("test AUC")
    aucs = [m["auc"] for by in comparison["institutions"].values() for m in by.values() if m and m["auc"] is not None]
    ax.set_ylim(max(0.0, min(aucs, default=0.5) - 0.05), min(1.0, max(aucs, default=1.0) + 0.03))
    ax.set_title("Test AUC per institution and transfer mode")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
