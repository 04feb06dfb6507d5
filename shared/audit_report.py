"""What `fedchurn audit` writes for each institution's privacy officer: a Markdown report and a PNG of ε."""

from __future__ import annotations

import math
from pathlib import Path

from shared.audit import (
    BELOW_PLD_TOLERANCE,
    RDP_ABS_LIMIT,
    RDP_RATIO_LIMIT,
    SAME_ACCOUNTANT_RTOL,
    InstitutionAudit,
    RunAudit,
)

__all__ = ["write_reports"]

AUDIT_DIR = "audit"


def write_reports(audit: RunAudit, out_dir: Path | None = None) -> list[Path]:
    """``RUN_DIR/audit/NAME.md`` and ``NAME-epsilon.png`` per institution; returns the paths written."""
    folder = out_dir or audit.run_dir / AUDIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for institution in audit.institutions:
        png = folder / f"{institution.name}-epsilon.png"
        if institution.rounds:
            _plot(institution, png)
        md = folder / f"{institution.name}.md"
        md.write_text(_markdown(audit, institution, png if institution.rounds else None), encoding="utf-8")
        written.extend([md] + ([png] if institution.rounds else []))
    return written


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def _markdown(audit: RunAudit, inst: InstitutionAudit, png: Path | None) -> str:
    verdict = "PASSED" if inst.passed else "FAILED"
    lines = [
        f"# Privacy audit: {inst.name}",
        "",
        f"Run folder `{audit.run_dir.name}`, run id {inst.run_id}. Verdict: **{verdict}**.",
        "",
    ]
    if inst.tampering:
        lines += ["## Ledger tampering", ""] + [f"- {p}" for p in inst.tampering] + [""]
    if inst.findings:
        lines += ["## Findings", ""] + [f"- {p}" for p in inst.findings] + [""]
    lines += [
        "## Customer-level guarantee (DP-SGD at this institution)",
        "",
        "| | |",
        "|---|---|",
        "| Privacy unit | one customer row of this institution (add/remove one row) |",
        f"| ε (cumulative, all rounds of this run) | {_fmt(inst.epsilon)} |",
        f"| δ | {_fmt(inst.delta)} |",
        f"| Accountant | {inst.accountant} (Opacus) |",
        f"| Independent check: dp-accounting PLD | {_fmt(inst.epsilon_pld)} |",
        f"| Independent check: dp-accounting RDP | {_fmt(inst.epsilon_rdp_independent)} |",
        f"| Budget (max ε) | {_fmt(inst.max_epsilon)} |",
        f"| Budget remaining | {_fmt(inst.budget_remaining)} |",
        f"| Clipping norm | {_fmt(inst.clipping_norm)} |",
        f"| Training rows | {inst.dataset_size} |",
        f"| Rounds trained | {len(inst.rounds)} |",
        "",
    ]
    if inst.stopped:
        lines += [
            f"Stopped by its budget before round {inst.stopped.get('round')}: {inst.stopped.get('reason')}.",
            "",
        ]
    if inst.rounds:
        lines += [
            "### Composition over rounds",
            "",
            "ε after each round is the ε of *all* rounds so far, composed (never per round, never summed).",
            "",
            "| round | steps | σ | q | ε recorded | ε recomposed |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in inst.rounds:
            lines.append(
                f"| {r.round} | {r.steps} | {r.noise_multiplier:g} | {r.sample_rate:.4g} | "
                f"{_fmt(r.epsilon_recorded, 6)} | {_fmt(r.epsilon_recomposed, 6)} |"
            )
        lines.append("")
    if png is not None:
        lines += [f"![ε over rounds]({png.name})", ""]
    lines += [
        "### Assumptions",
        "",
        "- Poisson sampling: every row joins every DP-SGD batch independently with probability q.",
        "- Per-sample gradients clipped to the clipping norm; Gaussian noise σ × clipping norm on their sum.",
        "- The noise is pseudo-random (Opacus secure_mode off): adequate for research, not a production claim.",
        "- ε is per run: the rows' privacy spent in other runs on the same data composes on top of it.",
        "",
        "### Not covered",
        "",
        "- Metrics sent to the server each round (AUC, loss, counts, ε itself) are not protected by DP; only "
        "a fixed whitelist of them is sent.",
        "- The row count of the institution (it weights the federated average) is disclosed.",
        "",
        "### How this was checked",
        "",
        f"- Hash chain of every ledger record verified ({len(inst.rounds)} records in this run).",
        f"- ε recomposed from the recorded (σ, q, steps) with {inst.accountant}: equal to the recorded values "
        f"within a relative {SAME_ACCOUNTANT_RTOL:g}.",
        f"- Independent: not below dp-accounting PLD − {BELOW_PLD_TOLERANCE} (PLD is the tightest valid bound; "
        f"RDP and Opacus PRV lie above it) and not above {RDP_RATIO_LIMIT} × dp-accounting RDP + {RDP_ABS_LIMIT}.",
        "- Ledger held against the institution's state file and the consortium's record of its reports.",
        "",
    ]
    if audit.institution_dp:
        dp = audit.institution_dp
        lines += [
            "## Institution-level guarantee (server-side clipping and noise)",
            "",
            "A different guarantee: for this institution's *whole* encoder update in each round (all its customers "
            "together), from server-side clipping and noise. It does not replace the customer-level ε above.",
            "",
            f"- ε = {_fmt(dp.get('epsilon_recorded'))} at δ = {_fmt(dp.get('delta'))} over {dp.get('releases')} "
            f"noisy releases (independent dp-accounting PLD: {_fmt(dp.get('epsilon_pld_independent'))}).",
            "",
        ]
    if inst.versions:
        lines += ["### Library versions", ""] + [f"- {k}: {v}" for k, v in sorted(inst.versions.items())] + [""]
    return "\n".join(lines)


def _plot(inst: InstitutionAudit, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in inst.rounds]
    recorded = [r.epsilon_recorded for r in inst.rounds]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(rounds, recorded, marker="o", label=f"ε ({inst.accountant}, cumulative)")
    if inst.epsilon_pld is not None:
        ax.scatter([rounds[-1]], [inst.epsilon_pld], marker="x", color="black", label="dp-accounting PLD (final)")
    if inst.max_epsilon is not None:
        ax.axhline(inst.max_epsilon, color="red", linestyle="--", label=f"budget {inst.max_epsilon:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"ε at δ = {_fmt(inst.delta)}")
    ax.set_title(f"{inst.name}: privacy spent over rounds")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
