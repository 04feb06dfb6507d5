"""The report's charts: matplotlib figures rendered to SVG and embedded as data-URI images.

An ``<img>`` holding an SVG never runs script and never joins the page's DOM, so whatever a bank name or a config
value holds cannot reach the page through a chart. Legible with many banks: with more than
:data:`MAX_COLOURED` banks every bank is a thin grey line, the consortium median a black one, and only the banks
that matter most (lowest AUC, nearest their cap) get a colour and a legend entry; the tables list every bank.
"""

from __future__ import annotations

import base64
import io
import math
import statistics
from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedchurn.reporting.run_folder import ReliabilityBin

CHANCE_AUC = 0.5
MAX_COLOURED = 8  # up to this many banks: one colour and legend entry each
HIGHLIGHTED = 5  # beyond it: this many banks highlighted
GREY = "#b8b8b8"
MAX_PANELS = 24  # reliability diagrams drawn; beyond it, the banks with the largest ECE
PANEL_COLUMNS = 4
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")

Series = Mapping[int, float | None]


def text(value: str) -> str:
    """A name as matplotlib must show it: literally (no mathtext from ``$``)."""
    return value.replace("$", r"\$")


def to_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def highlighted(names: Sequence[str], score: Mapping[str, float | None], *, worst_first: bool = True) -> list[str]:
    """Every bank when few; else the HIGHLIGHTED banks with the lowest (or highest) score."""
    if len(names) <= MAX_COLOURED:
        return list(names)
    scored = [n for n in names if score.get(n) is not None]
    scored.sort(key=lambda n: score[n] or 0.0, reverse=not worst_first)
    return scored[:HIGHLIGHTED]


def _points(series: Series) -> tuple[list[int], list[float]]:
    rounds = sorted(series)
    return rounds, [math.nan if series[r] is None else float(series[r]) for r in rounds]  # type: ignore[arg-type]


def _median_line(per_bank: Mapping[str, Series]) -> tuple[list[int], list[float]]:
    rounds = sorted({r for s in per_bank.values() for r in s})
    xs, ys = [], []
    for r in rounds:
        values = [v for s in per_bank.values() if (v := s.get(r)) is not None]
        if values:
            xs.append(r)
            ys.append(statistics.median(values))
    return xs, ys


def per_round_figure(
    per_bank: Mapping[str, Series],
    *,
    highlight: Sequence[str],
    ylabel: str,
    title: str,
    chance: float | None = None,
    caps: Mapping[str, float | None] | None = None,
    kept: Mapping[str, int | None] | None = None,
) -> Figure:
    """One line per bank over rounds. ``chance``: a dashed reference; ``kept``: a star on the kept round."""
    fig, ax = _figure(8.0, 4.2)
    many = len(per_bank) > MAX_COLOURED
    for name, series in per_bank.items():
        if name in highlight:
            continue
        xs, ys = _points(series)
        ax.plot(xs, ys, color=GREY if many else PALETTE[0], linewidth=0.8, marker=".", markersize=3, zorder=1)
    for index, name in enumerate(highlight):
        colour = PALETTE[index % len(PALETTE)]
        xs, ys = _points(per_bank.get(name, {}))
        ax.plot(xs, ys, color=colour, linewidth=1.8, marker="o", markersize=4, label=text(name), zorder=3)
        round_kept = (kept or {}).get(name)
        value = per_bank.get(name, {}).get(round_kept) if round_kept is not None else None
        if round_kept is not None and value is not None:
            ax.plot([round_kept], [value], marker="*", markersize=13, color=colour, markeredgecolor="black", zorder=4)
        cap = (caps or {}).get(name)
        if cap is not None and not many:
            ax.axhline(cap, color=colour, linestyle=":", linewidth=1)
    if many:
        xs, ys = _median_line(per_bank)
        ax.plot(xs, ys, color="black", linewidth=2.4, label="median of all banks", zorder=2)
    if chance is not None:
        ax.axhline(chance, color="tab:red", linestyle="--", linewidth=1.2, label=f"chance ({chance:g})")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(left=0.5)  # rounds count from 1: a single release (round 5) still shows where it sits in the run
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def budget_chart(spent: Mapping[str, float | None], caps: Mapping[str, float | None], *, delta: float | None) -> str:
    """A bar per bank: lifetime ε, its cap as a black tick; orange at 80 % of the cap, red at or over it."""
    names = list(spent)
    fig, ax = _figure(8.0, max(2.6, 0.26 * len(names) + 1.2))
    for y, name in enumerate(names):
        value = spent[name] or 0.0
        cap = caps.get(name)
        colour = (
            "tab:gray"
            if cap is None
            else "tab:red"
            if value >= cap
            else "tab:orange"
            if value >= 0.8 * cap
            else "tab:green"
        )
        ax.barh(y, value, color=colour, height=0.7)
        if cap is not None:
            ax.plot([cap, cap], [y - 0.45, y + 0.45], color="black", linewidth=2.2)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([text(n) for n in names], fontsize=7 if len(names) > 20 else 8)
    ax.invert_yaxis()
    ax.set_xlabel(f"lifetime ε per customer row (δ = {delta:g})" if delta else "lifetime ε per customer row")
    ax.set_title("ε spent (bar) against each bank's lifetime cap (black tick); grey: no cap", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return to_data_uri(fig)


def reliability_figure(
    bins: Mapping[str, Sequence[ReliabilityBin]], *, min_rows: Mapping[str, float], rounds: Mapping[str, int]
) -> Figure:
    """Small multiples, one reliability diagram per bank: each histogram bin of its released test histogram at
    (calibrated probability, noisy churn rate), its area by its noisy row count; grey: fewer than ``min_rows[bank]``
    noisy rows (the noise dominates its rate). The dashed diagonal is perfect calibration."""
    names = list(bins)
    columns = min(PANEL_COLUMNS, max(1, len(names)))
    rows_of_panels = math.ceil(len(names) / columns)
    fig = Figure(figsize=(2.4 * columns + 0.4, 2.4 * rows_of_panels + 0.6), layout="constrained")
    axes = fig.subplots(rows_of_panels, columns, sharex=True, sharey=True, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(names):
            ax.set_visible(False)
            continue
        name = names[index]
        drawn = [b for b in bins[name] if b.rate is not None]
        largest = max([b.rows for b in drawn] + [1.0])
        floor = min_rows.get(name, 0.0)
        ax.plot([0, 1], [0, 1], color="tab:red", linestyle="--", linewidth=0.9)
        for enough in (False, True):
            chosen = [b for b in drawn if (b.rows >= floor) is enough]
            ax.scatter(
                [b.probability for b in chosen],
                [b.rate for b in chosen],
                s=[8.0 + 140.0 * b.rows / largest for b in chosen],
                color="tab:blue" if enough else GREY,
                edgecolors="black" if enough else "none",
                linewidths=0.4,
                alpha=0.9,
                zorder=3 if enough else 2,
            )
        ax.set_xlim(-0.03, 1.03)  # a bin at rate 0 or 1 is drawn whole
        ax.set_ylim(-0.03, 1.03)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        title = text(name if len(name) <= 28 else name[:27] + "…")
        ax.set_title(f"{title} (round {rounds.get(name, '?')})", fontsize=8)
        ax.tick_params(labelsize=7)
        if index + columns >= len(names):  # the lowest panel of its column: its own probability axis
            ax.tick_params(labelbottom=True)
    fig.supxlabel("calibrated churn probability of the bin", fontsize=9)
    fig.supylabel("observed churn rate (noisy)", fontsize=9)
    return fig


def ece_chart(ece: Mapping[str, float | None], kept_ece: Mapping[str, float | None]) -> str:
    """ECE per bank: the last release, and the kept model's."""
    names = list(ece)
    fig, ax = _figure(8.0, max(2.6, 0.26 * len(names) + 1.2))
    ys = list(range(len(names)))
    ax.barh([y - 0.18 for y in ys], [ece[n] or 0.0 for n in names], height=0.36, color="tab:blue", label="last release")
    ax.barh(
        [y + 0.18 for y in ys],
        [kept_ece.get(n) or 0.0 for n in names],
        height=0.36,
        color="tab:orange",
        label="kept model",
    )
    ax.set_yticks(ys)
    ax.set_yticklabels([text(n) for n in names], fontsize=7 if len(names) > 20 else 8)
    ax.invert_yaxis()
    ax.set_xlabel("expected calibration error (from the DP-released test histogram)")
    ax.set_title("ECE per bank (lower is better; a missing bar: not released)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return to_data_uri(fig)


def platt_chart(maps: Mapping[str, tuple[float, float]], *, highlight: Sequence[str]) -> str:
    """Each kept model's Platt map: the model's own probability to the calibrated one (diagonal: unchanged)."""
    import numpy as np

    fig, ax = _figure(5.2, 5.0)
    raw = np.linspace(0.002, 0.998, 200)
    logit = np.log(raw / (1 - raw))
    many = len(maps) > MAX_COLOURED
    ax.plot([0, 1], [0, 1], color="tab:red", linestyle="--", linewidth=1, label="no change")
    for name, (a, b) in maps.items():
        calibrated = 1 / (1 + np.exp(-(a * logit + b)))
        if name in highlight:
            colour = PALETTE[list(highlight).index(name) % len(PALETTE)]
            ax.plot(raw, calibrated, color=colour, linewidth=1.6, label=text(name))
        else:
            ax.plot(raw, calibrated, color=GREY if many else PALETTE[0], linewidth=0.8)
    ax.set_xlabel("model's probability")
    ax.set_ylabel("calibrated probability")
    ax.set_title("Platt maps of the kept models", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return to_data_uri(fig)


def comparison_chart(comparison: Mapping[str, object]) -> str:
    """The comparison's own chart (fedchurn/comparison/report.py), as SVG."""
    import tempfile
    from pathlib import Path

    from fedchurn.comparison.report import plot_comparison

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "comparison.svg"
        plot_comparison(comparison, path)
        return "data:image/svg+xml;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
