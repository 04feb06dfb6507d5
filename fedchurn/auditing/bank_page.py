"""What `fedchurn audit` writes for each institution's privacy officer: a one-page report (Markdown and HTML) and a
PNG of ε over rounds."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

from fedchurn.auditing.findings import (
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
        text = _markdown(audit, institution, png if institution.rounds else None)
        md.write_text(text, encoding="utf-8")
        page = folder / f"{institution.name}.html"
        page.write_text(_html(text, title=f"Privacy audit: {institution.name}"), encoding="utf-8")
        written.extend([md, page] + ([png] if institution.rounds else []))
    return written


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def _replace_one(epsilon: float | None, delta: float | None) -> str:
    """Add/remove (ε, δ) as replace-one: one removal then one addition, group privacy of 2 (a safe upper bound)."""
    if epsilon is None or delta is None or math.isinf(epsilon):
        return "n/a"
    return f"ε ≤ {_fmt(2 * epsilon)}, δ ≤ {_fmt((1 + math.exp(epsilon)) * delta)}"


def _markdown(audit: RunAudit, inst: InstitutionAudit, png: Path | None) -> str:
    verdict = "PASSED" if inst.passed else "FAILED"
    sig = inst.signatures
    lines = [
        f"# Privacy audit: {inst.name}",
        "",
        f"Folder `{audit.run_dir.name}`, run {inst.run_id}. Verdict: **{verdict}**. One page for the privacy officer: "
        "what is guaranteed, to whom, how it was checked, and what is not covered.",
        "",
    ]
    if inst.tampering:
        lines += ["## Ledger tampering", ""] + [f"- {p}" for p in inst.tampering] + [""]
    if inst.findings:
        lines += ["## Findings", ""] + [f"- {p}" for p in inst.findings] + [""]
    lines += [
        "## The guarantee, exactly (DP-SGD at this bank)",
        "",
        "| | |",
        "|---|---|",
        "| Privacy unit | one customer row of this bank's training rows |",
        "| Adjacency | add/remove one row. The training-set size n is reported to the server with each update, so "
        "for what the server sees the honest notion is replace-one: "
        f"{_replace_one(inst.lifetime_epsilon or inst.epsilon, inst.delta)} (lifetime, group privacy of 2) |",
        f"| ε this run | {_fmt(inst.epsilon)} |",
        f"| ε lifetime (every run in this ledger on the same rows: {inst.lifetime_runs}) | "
        f"{_fmt(inst.lifetime_epsilon)} |",
        f"| δ | {_fmt(inst.delta)} |",
        f"| Accountant | {inst.accountant} (Opacus); composition over every DP-SGD step of every round and run |",
        f"| Independent check: dp-accounting PLD | {_fmt(inst.epsilon_pld)} |",
        f"| Independent check: dp-accounting RDP | {_fmt(inst.epsilon_rdp_independent)} |",
        f"| Budget (max ε) | {_fmt(inst.max_epsilon)} |",
        f"| Budget remaining | {_fmt(inst.budget_remaining)} |",
        f"| Clipping norm | {_fmt(inst.clipping_norm)} |",
        f"| Training rows | {inst.dataset_size} |",
        f"| Rounds trained (this run) | {len(inst.rounds)} |",
        "",
    ]
    if inst.empirical:
        emp = inst.empirical
        lines += [
            "## Empirical lower bound (measured, not assumed)",
            "",
            f"A canary run of this bank's own training code (Steinke, Nasr & Jagielski 2023, one training run): "
            f"{emp['black_box']['m']} canaries, each included with probability 1/2 from a secure random source; "
            f"{emp['black_box']['r']} guesses per attacker. With confidence {1 - emp['beta']:g}:",
            "",
            "| attacker | correct guesses | ε at least |",
            "|---|---:|---:|",
            f"| black-box (final model's loss) | {emp['black_box']['v']}/{emp['black_box']['r']} | "
            f"{_fmt(emp['black_box_epsilon'])} |",
            f"| white-box (the per-round updates the server sees) | {emp['white_box']['v']}/{emp['white_box']['r']} "
            f"| {_fmt(emp['white_box_epsilon'])} |",
            "",
            f"Claimed ε for that canary run (its n, q = {emp['sample_rate']:.4g}, {emp['steps']} steps, "
            f"σ = {emp['noise_multiplier']:g}): {_fmt(emp['claimed_epsilon'])}. A lower bound above it would mean the "
            "guarantee does not hold as implemented; one far below it does not prove the guarantee (a one-run audit "
            "is loose).",
            "",
        ]
    if sig:
        checked = sig.get("consortium_key_checked_against") or "nothing (give --consortium-key FINGERPRINT)"
        lines += [
            "## Signatures: who vouches for these records",
            "",
            f"- Signed by the bank: {sig['signed']}/{sig['records']} records (key fingerprint "
            f"`{sig.get('bank_key_fingerprint')}`).",
            f"- Countersigned by the consortium over the original record hash: {sig['countersigned']}/"
            f"{sig.get('training_records', sig['records'])} training records (key fingerprint "
            f"`{sig.get('consortium_key_fingerprint')}`, checked against {checked}); evaluation releases never travel "
            "and are anchored by the chain through the next countersigned record; not (yet) anchored by a "
            f"countersignature: {sig.get('pending_countersignature') or 'none'}.",
            "- A rewrite by the bank alone cannot carry the consortium's countersignatures; one by the server alone "
            "cannot carry the bank's signatures.",
            "",
        ]
    if inst.notes:
        lines += ["### Notes", ""] + [f"- {n}" for n in inst.notes] + [""]
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
        "### Covered",
        "",
        "- Every DP-SGD step on this bank's training rows, in every round of every run recorded in this ledger "
        "(Poisson sampling with rate q, each row's gradient clipped to the clipping norm, Gaussian noise σ × norm).",
        "- Preprocessing: features come from declared public bounds and category lists only, so one customer "
        "changes only its own features (no scaling or imputation statistic of the rows).",
        "- Everything computed afterwards from the trained encoder and head (post-processing).",
        "",
        "### Not covered",
        "",
        "- Metrics sent to the server (validation/test AUC, loss, counts, ε itself) unless released with DP; only a "
        "fixed whitelist of them is sent.",
        "- The training-set size n, sent with every update (hence the replace-one figure above).",
        "- Which rows are training, validation and test rows (the split), and the validation/test rows themselves.",
        "- Customers in several rows (the unit is a row, not a person), and correlations between customers.",
        "- Noise the server could predict: the guarantee assumes the bank draws its noise and Poisson batches from "
        "a secret source the server cannot know.",
        "",
        "### How this was checked",
        "",
        f"- Hash chain of every ledger record verified; bank signature and consortium countersignature of each "
        f"({len(inst.rounds)} records in this run).",
        "- Each record against what ran: DP-SGD with σ > 0 in every round; q = 1/ceil(n/B) and steps = epochs × "
        "ceil(n/B) re-derived from the recorded n and batch size; the run's config when its folder holds it.",
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
    lines += [
        "## Sign-off",
        "",
        "Reviewed by: ______________________   Role: ______________________   Date: ____________",
        "",
        "Signature: ______________________",
        "",
    ]
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


def _inline(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _html(markdown: str, *, title: str) -> str:
    """The report's Markdown as a self-contained, printable HTML page (the subset the report uses)."""
    body: list[str] = []
    table: list[list[str]] = []
    bullets: list[str] = []

    def flush() -> None:
        if table:
            head, *rows = table
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            body.extend("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append("</table>")
            table.clear()
        if bullets:
            body.append("<ul>" + "".join(f"<li>{_inline(b)}</li>" for b in bullets) + "</ul>")
            bullets.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):  # skip the |---| separator row
                table.append(cells)
            continue
        if line.startswith("- "):
            bullets.append(line[2:])
            continue
        flush()
        heading = re.match(r"(#{1,3}) (.*)", line)
        image = re.match(r"!\[([^\]]*)\]\(([^)]+)\)", line)
        if heading:
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image:
            body.append(f'<img alt="{html.escape(image.group(1))}" src="{html.escape(image.group(2))}">')
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #999;padding:.2em .5em;text-align:left}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
