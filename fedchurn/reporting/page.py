"""``RUN/report.html``: one self-contained page (embedded CSS, charts as data-URI SVG, no script, no network).

Every string that comes from the run folder (bank names, config values, reasons) is HTML-escaped here.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import fedchurn.reporting.charts as charts
from fedchurn.reporting.run_folder import RunFolder, evaluation_sigma, lifetime_cap, read_run_folder

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
VERSION_KEYS = ("python", "torch", "flwr", "opacus", "fedchurn")

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left}th{background:#f3f3f3}
td.n{text-align:right;font-variant-numeric:tabular-nums}td:first-child{white-space:nowrap}
figure{margin:1em 0}figure img{width:100%;max-width:900px;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.note{font-size:.9em;color:#444;background:#f8f8f0;border-left:3px solid #cc9;padding:.4em .8em}
.warn{color:#a00}pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.8em}
.grid{display:flex;flex-wrap:wrap;gap:1em}.grid figure{flex:1 1 420px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "∞"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?( %)?$|^[—∞]$")


def _cell(value: Any) -> str:
    text = esc(value)
    return f'<td class="n">{text}</td>' if NUMBER.match(str(value)) else f"<td>{text}</td>"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, facts: bool = False) -> str:
    head = "" if facts else "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    klass = ' class="facts"' if facts else ""
    return f"<table{klass}>{head}<tbody>{body}</tbody></table>"


def _figure(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{esc(alt)}" class="chart"><figcaption>{esc(caption)}</figcaption></figure>'


def _last(series: Mapping[int, float | None]) -> float | None:
    return series[max(series)] if series else None


def _lifetime_epsilon(run: RunFolder, name: str) -> float | None:
    """The largest ε the server heard of from this bank: its last release, or any later training reply."""
    released = ((run.summary or {}).get("institutions") or {}).get(name) or {}
    values = [released.get("epsilon")]
    if name in run.series:
        values.append(_last(run.series[name].epsilon))
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return max(finite) if finite else None


def _cap(run: RunFolder, name: str) -> float | None:
    """The bank's lifetime ε cap: as it stated it when it stopped or declined, else as the config sets it for a
    simulated bank."""
    budget = (run.summary or {}).get("budget") or {}
    stated = [((budget.get("stopped") or {}).get(name) or {}).get("max_epsilon")]
    stated += [d.get("max_epsilon") for d in budget.get("declines") or [] if d.get("institution") == name]
    finite = [float(v) for v in stated if isinstance(v, (int, float)) and math.isfinite(v)]
    return min(finite) if finite else lifetime_cap(run.config, name)


def _run_sections(run: RunFolder) -> list[str]:
    summary = run.summary or {}
    config = run.config
    released = summary.get("institutions") or {}
    budget = summary.get("budget") or {}
    stopped = budget.get("stopped") or {}
    withheld = summary.get("evaluation_withheld") or {}
    names = run.institutions
    delta = (config.get("privacy") or {}).get("delta")
    private = bool((config.get("privacy") or {}).get("enabled", True))
    caps = {n: _cap(run, n) for n in names}
    kept_round = {n: (released.get(n) or {}).get("model_round") for n in names}
    lifetime = {n: _lifetime_epsilon(run, n) for n in names}
    sections: list[str] = []

    # --- overview --------------------------------------------------------------------------------
    rows = []
    for name in names:
        m = released.get(name) or {}
        # Rounds without a release are usually the release schedule (evaluation.every_rounds), not a refusal:
        # only a bank that released nothing at all is flagged here; the privacy table lists the rounds.
        nothing_released = all(m.get(key) is None for key in ("auc", "pr_auc", "ece", "mean_probability"))
        status = (
            "stopped at budget"
            if name in stopped
            else "no evaluation released"
            if name in withheld and nothing_released
            else ""
        )
        rows.append(
            [
                name,
                _fmt(m.get("auc")),
                _fmt(m.get("pr_auc")),
                _fmt(m.get("ece")),
                _fmt(m.get("model_round")),
                _fmt(m.get("model_auc")),
                _fmt(m.get("model_ece")),
                _fmt(lifetime[name]) if private else "off",
                _fmt(caps[name], 2),
                status,
            ]
        )
    sections.append(
        "<h2>Banks</h2>"
        + _table(
            ["bank", "AUC", "PR-AUC", "ECE", "kept round", "kept AUC", "kept ECE", "lifetime ε", "ε cap", "status"],
            rows,
        )
        + '<p class="note">AUC, PR-AUC and ECE come from each bank\'s last DP-noised score histogram of its test rows. '
        "Kept round: the model each bank keeps (best DP validation AUC), which <code>fedchurn predict</code> uses. "
        "—: not released (evaluation off, withheld by the bank, or undefined under the noise).</p>"
    )

    # --- AUC and ε per round ----------------------------------------------------------------------
    auc = {n: run.series[n].auc for n in names if n in run.series and run.series[n].auc}
    every = (config.get("evaluation") or {}).get("every_rounds")
    if auc:
        final_auc = {n: _last(s) for n, s in auc.items()}
        chosen = charts.highlighted(list(auc), final_auc)
        caption = "Test AUC per round per bank (DP-released); red dashed: chance (0.5); star: the kept model's round."
        if len(auc) > charts.MAX_COLOURED:
            caption += f" Grey: every bank; black: median; coloured: the {len(chosen)} banks with the lowest last AUC."
        if max(len(series) for series in auc.values()) <= 1:
            caption += (
                f" One release per bank (evaluation.every_rounds = {every}): set it to k > 0 for one every k rounds."
            )
        uri = charts.to_data_uri(
            charts.per_round_figure(
                auc,
                highlight=chosen,
                ylabel="test AUC",
                title="AUC per round",
                chance=charts.CHANCE_AUC,
                kept=kept_round,
            )
        )
        sections.append("<h2>AUC per round</h2>" + _figure(uri, "AUC per round per bank", caption))
    else:
        sections.append("<h2>AUC per round</h2><p>No bank released evaluation metrics in this run.</p>")

    eps = {n: run.series[n].epsilon for n in names if n in run.series and run.series[n].epsilon}
    if private and eps:
        near: dict[str, float | None] = {}
        for n in eps:
            cap = caps[n]
            near[n] = (lifetime[n] or 0.0) / cap if cap else lifetime[n]
        chosen = charts.highlighted(list(eps), near, worst_first=False)
        caption = "Lifetime ε per customer row reported by each bank at the end of each round (training and releases)."
        if len(eps) > charts.MAX_COLOURED:
            caption += f" Grey: every bank; black: median; coloured: the {len(chosen)} banks nearest their cap."
        else:
            caption += " Dotted: each bank's lifetime cap."
        uri = charts.to_data_uri(
            charts.per_round_figure(
                eps, highlight=chosen, ylabel=f"lifetime ε (δ = {delta})", title="ε per round", caps=caps
            )
        )
        sections.append("<h2>ε per round</h2>" + _figure(uri, "epsilon per round per bank", caption))

    # --- the privacy team's page ----------------------------------------------------------------
    sections.append(_privacy_section(run, names, lifetime, caps, private=private))

    # --- calibration -----------------------------------------------------------------------------
    sections.append(_calibration_section(run, names))

    dropped = summary.get("dropped_replies") or []
    if dropped:
        reasons = [[d.get("round"), d.get("phase"), d.get("institution"), d.get("reason")] for d in dropped[:200]]
        sections.append(
            f"<h2>Dropped replies ({len(dropped)})</h2>"
            + _table(["round", "phase", "bank", "reason"], reasons)
            + ("<p>First 200 shown; all in rounds.jsonl.</p>" if len(dropped) > 200 else "")
        )
    return sections


def _rounds(value: Any) -> str:
    if isinstance(value, list):
        return "rounds " + ", ".join(str(v) for v in value) if value else ""
    return "" if value is None else str(value)


def _privacy_section(
    run: RunFolder,
    names: Sequence[str],
    lifetime: Mapping[str, float | None],
    caps: Mapping[str, float | None],
    *,
    private: bool,
) -> str:
    summary = run.summary or {}
    config = run.config
    budget = summary.get("budget") or {}
    stopped = budget.get("stopped") or {}
    withheld = summary.get("evaluation_withheld") or {}
    privacy = config.get("privacy") or {}
    delta = privacy.get("delta")
    parts = ["<h2>Privacy: ε against each bank's budget</h2>"]
    if not private:
        parts.append('<p class="warn">Differential privacy was OFF in this run: no ε bounds what left the banks.</p>')
    else:
        uri = charts.budget_chart(dict(lifetime), caps, delta=delta if isinstance(delta, (int, float)) else None)
        parts.append(
            _figure(
                uri,
                "lifetime epsilon against each bank's cap",
                "Lifetime ε spent per bank (bar) and its cap (black tick). Green: below 80 % of the cap; orange: "
                "80 % or more; red: at or over it; grey: no cap.",
            )
        )
    rows = []
    for name in names:
        spent, cap = lifetime[name], caps[name]
        series = run.series.get(name)
        rows.append(
            [
                name,
                _fmt(spent) if private else "off",
                _fmt(cap, 2),
                f"{100 * spent / cap:.0f} %" if spent is not None and cap else "—",
                f"{delta:g}" if private and isinstance(delta, (int, float)) else "—",
                _fmt(series.noise_multiplier) if series else "—",
                _fmt(evaluation_sigma(config, name)),
                f"before round {stopped[name].get('round')}: {stopped[name].get('reason')}" if name in stopped else "",
                _rounds(withheld.get(name)),
            ]
        )
    parts.append(
        _table(
            [
                "bank",
                "lifetime ε",
                "cap",
                "of cap",
                "δ",
                "σ training",
                "σ evaluation",
                "stopped",
                "no evaluation release in",
            ],
            rows,
        )
    )
    parts.append(
        '<p class="note">Lifetime ε: per customer row, add/remove adjacency, composing every training round and '
        "every evaluation release on the bank's rows, in this and earlier runs (the bank's own ledger). Rounds "
        "without an evaluation release follow the release schedule (evaluation.every_rounds; by default one "
        "release, after the last round) or the bank's policy. The cap "
        "shown is the one a simulated bank applies: its policy's lifetime cap lowered by the config's budget; a "
        "real bank's own policy may be stricter and is not in this folder.</p>"
    )
    covered = summary.get("privacy") or {}
    facts = [
        [key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)]
        for key, value in covered.items()
    ]
    institution_dp = summary.get("institution_dp")
    if institution_dp is not None:
        facts.append(["institution-level DP", json.dumps(institution_dp, ensure_ascii=False)])
    if summary.get("noise"):
        facts.append(["noise", summary["noise"]])
    if facts:
        parts.append("<h3>What ε covers and what it does not</h3>" + _table([], facts, facts=True))
    declines = budget.get("declines") or []
    if declines:
        rows = [
            [d.get("round"), d.get("institution"), d.get("reason_code", ""), d.get("reason", "")]
            for d in declines[:200]
        ]
        parts.append(
            f"<h3>Declines ({len(declines)})</h3>"
            + _table(["round", "bank", "code", "reason"], rows)
            + ("<p>First 200 shown.</p>" if len(declines) > 200 else "")
        )
    return "".join(parts)


def _calibration_section(run: RunFolder, names: Sequence[str]) -> str:
    released = (run.summary or {}).get("institutions") or {}
    parts = ["<h2>Calibration</h2>"]
    points = {
        n: ((released.get(n) or {}).get("mean_probability"), (released.get(n) or {}).get("churn_rate")) for n in names
    }
    ece = {n: (released.get(n) or {}).get("ece") for n in names if n in released}
    if not any(x is not None and y is not None for x, y in points.values()):
        parts.append("<p>No bank released calibration statistics in this run.</p>")
        return "".join(parts)
    kept_ece = {n: (released.get(n) or {}).get("model_ece") for n in names}
    parts.append(
        _table(
            ["bank", "mean predicted churn probability (calibrated)", "observed churn rate", "ECE"],
            ([n, _fmt(points[n][0]), _fmt(points[n][1]), _fmt(ece.get(n))] for n in names if n in released),
        )
    )
    figures = [_reliability_figure(run, names, ece)]
    maps: dict[str, tuple[float, float]] = {}
    for name, record in run.kept.items():
        calibration = record.get("calibration") or {}
        a, b = calibration.get("a"), calibration.get("b")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a) and math.isfinite(b):
            maps[name] = (float(a), float(b))
    if maps:
        chosen = charts.highlighted(
            list(maps), {n: abs(a - 1.0) + abs(b) for n, (a, b) in maps.items()}, worst_first=False
        )
        figures.append(
            _figure(
                charts.platt_chart(maps, highlight=chosen),
                "Platt maps of the kept models",
                "How each kept model's calibration (fitted on a DP-released histogram) maps its probability.",
            )
        )
    parts.append('<div class="grid">' + "".join(figures) + "</div>")
    parts.append(_figure(charts.ece_chart(ece, kept_ece), "ECE per bank", "Expected calibration error per bank."))
    return "".join(parts)


def _reliability_figure(run: RunFolder, names: Sequence[str], ece: Mapping[str, Any]) -> str:
    """Each bank's reliability diagram of its last release that carried one (its per-bin figures)."""
    latest = {n: r for n in names if (s := run.series.get(n)) is not None and (r := s.reliability)}
    if not latest:
        return '<p class="note">No bank sent per-bin calibration figures in this run.</p>'
    shown = list(latest)
    if len(shown) > charts.MAX_PANELS:
        shown = sorted(shown, key=lambda n: -(ece.get(n) or 0.0))[: charts.MAX_PANELS]
    min_rows = {n: _min_bin_rows(evaluation_sigma(run.config, n)) for n in shown}
    uri = charts.to_data_uri(
        charts.reliability_figure(
            {n: latest[n][1] for n in shown}, min_rows=min_rows, rounds={n: latest[n][0] for n in shown}
        )
    )
    extra = (
        f" The {len(shown)} banks with the largest ECE of {len(latest)} are drawn." if len(shown) < len(latest) else ""
    )
    return _figure(
        uri,
        "reliability diagram per bank",
        "Per bank, each bin of its last DP-released test histogram: calibrated churn probability against the noisy "
        "observed churn rate, the area by the bin's noisy row count; grey: too few noisy rows for the rate to mean "
        "much (fewer than max(20, 3·√2·σ_e)). On the dashed diagonal: well calibrated." + extra,
    )


MIN_BIN_ROWS = 20.0


def _min_bin_rows(sigma: float | None) -> float:
    """Noisy rows under which a bin is greyed: a bin's row count carries noise of std σ_e·√2 (two cells)."""
    return max(MIN_BIN_ROWS, 3.0 * math.sqrt(2.0) * sigma) if sigma is not None else MIN_BIN_ROWS


def _comparison_section(run: RunFolder) -> str:
    from fedchurn.comparison.report import markdown_table

    comparison = run.comparison or {}
    parts = ["<h2>Comparison</h2>"]
    try:
        table = markdown_table(comparison)
    except (KeyError, TypeError, ValueError) as exc:
        return parts[0] + f"<p>comparison.json cannot be read ({esc(exc)}).</p>"
    lines = [line for line in table.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]
    if rows:
        parts.append(_table(rows[0], rows[1:]))
    notes = [line for line in table.splitlines() if line and not line.startswith("|")]
    parts.extend(f'<p class="note">{esc(n)}</p>' for n in notes)
    try:
        parts.append(_figure(charts.comparison_chart(comparison), "comparison chart", "Test AUC per mode per bank."))
    except Exception as exc:  # a malformed comparison: the table above still stands
        logger.warning("report: comparison chart skipped: %s", exc)
    if run.sub_reports:
        links = "".join(
            f'<li><a href="{esc(p.as_posix())}">{esc(p.parent.as_posix())}</a></li>' for p in run.sub_reports
        )
        parts.append(f"<h3>Reports of the runs</h3><ul>{links}</ul>")
    return "".join(parts)


def _provenance_section(run: RunFolder) -> str:
    summary = run.summary or {}
    versions = summary.get("versions")
    source = "recorded by the run"
    if not isinstance(versions, dict):
        from fedchurn.shared.provenance import library_versions

        versions, source = library_versions(), "of the software that wrote this report (the run recorded none)"
    shown = [[k, versions.get(k, "—")] for k in VERSION_KEYS] + [
        [k, v] for k, v in versions.items() if k not in VERSION_KEYS
    ]
    config_text = run.config_text or (json.dumps(run.config, indent=2) if run.config else "not recorded")
    return (
        f"<h2>Versions and config</h2><p>Versions {esc(source)}:</p>"
        + _table(["package", "version"], shown)
        + f"<details open><summary>config</summary><pre>{esc(config_text)}</pre></details>"
    )


def build_report(run: RunFolder) -> str:
    """The whole page as a string."""
    summary = run.summary or {}
    title = f"fedchurn report: {run.path.name}"
    facts = []
    if summary:
        facts = [
            ["run", summary.get("run_id", "—")],
            ["strategy", summary.get("strategy", "—")],
            ["transfer mode", (run.config.get("transfer") or {}).get("mode", "—")],
            ["rounds", f"{summary.get('rounds', '—')} of {summary.get('rounds_planned', '—')}"],
            ["banks", len(run.institutions)],
            ["seconds", _fmt(summary.get("seconds"), 1)],
        ]
    body = [f"<h1>{esc(title)}</h1>"]
    if facts:
        body.append(_table([], facts, facts=True))
    if run.summary is not None:
        body.extend(_run_sections(run))
    if run.comparison is not None:
        body.append(_comparison_section(run))
    body.append(_provenance_section(run))
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body.append(f'<p class="note">Written {esc(generated)} from the files in this folder. No script, no network.</p>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>" + "".join(body) + "</body></html>\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` for a run folder or a comparison folder; returns its path."""
    folder = Path(run_dir).expanduser().resolve()
    run = read_run_folder(folder)
    if run.summary is None and run.comparison is None:
        from fedchurn.shared.errors import FedChurnError

        raise FedChurnError(f"{folder} holds neither a run (summary.json) nor a comparison (comparison.json)")
    path = folder / REPORT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(build_report(run), encoding="utf-8")
    tmp.replace(path)
    return path


def write_report_safely(run_dir: str | Path) -> Path | None:
    """``write_report`` for the end of a run: a failure is a warning, never the run's failure."""
    try:
        return write_report(run_dir)
    except Exception as exc:  # the run's results stand without their report
        logger.warning("report.html not written for %s: %s", run_dir, exc)
        return None
