"""`fedchurn audit RUN_DIR`: verify every institution's privacy ledger and re-check its ε independently."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

EXIT_AUDIT_FAILED = 1


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "audit",
        help="verify the privacy ledgers of a run and re-check every ε independently",
        description="Verify each institution's hash-chained ledger, recompose its ε with the accountant it used "
        "and with Google's dp-accounting, and write a report per institution (RUN_DIR/audit/). "
        "Exits 1 when any ledger was tampered with or any check fails.",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="the output folder of a run, or one bank's own folder (its ledger.sqlite)"
    )
    parser.add_argument(
        "--consortium-key",
        metavar="FINGERPRINT",
        help="SHA-256 fingerprint of the consortium's ledger key, as the consortium publishes it: the countersignatures"
        " in a bank's ledger must be by that key (needed to rule out a swapped key when auditing a bank folder alone)",
    )
    parser.add_argument(
        "--empirical",
        action="store_true",
        help="also measure an empirical LOWER bound on ε: a canary training run of each bank through its own "
        "training code (Steinke, Nasr & Jagielski 2023, one run; black-box and white-box); needs the run's config",
    )
    parser.add_argument("--config", metavar="FILE", help="--empirical: the run's config (default RUN_DIR/config.yaml)")
    parser.add_argument(
        "--institution", action="append", metavar="NAME", help="--empirical: only these banks (repeatable)"
    )
    parser.add_argument("--canaries", type=int, default=1000, metavar="M", help="--empirical: canaries (default 1000)")
    parser.add_argument(
        "--beta", type=float, default=0.05, help="--empirical: the lower bounds hold with confidence 1 - beta"
    )
    parser.add_argument("--json", action="store_true", help="print the audit as JSON")
    parser.add_argument("--no-reports", action="store_true", help="check only; write no Markdown/PNG reports")
    parser.set_defaults(handler=run)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    """Progress (per bank, per check) on stderr while it runs; the audit on stdout."""
    from fedchurn.progress import run_with_progress

    return run_with_progress(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from fedchurn.auditing.run_audit import audit_run
    from fedchurn.progress import process_started, report_stage

    audit = audit_run(Path(args.run_dir), consortium_fingerprint=args.consortium_key)
    if args.empirical:
        from fedchurn.auditing.run_audit import add_empirical

        add_empirical(
            audit,
            config_path=Path(args.config) if args.config else None,
            institutions=args.institution,
            canaries=args.canaries,
            beta=args.beta,
        )
    reports = []
    if not args.no_reports:
        report_stage("writing the reports (Markdown and plots)")
        from fedchurn.auditing.bank_page import write_reports

        reports = write_reports(audit)
    if args.json:
        print(json.dumps(audit.to_dict(), indent=2, default=str))
    else:
        print(f"Audit of {audit.run_dir} (run {audit.run_id}):")
        for inst in audit.institutions:
            verdict = "ok  " if inst.passed else "FAIL"
            if inst.tampering:
                print(f"  {verdict} {inst.name:<22} ledger tampered with: its numbers are not used")
            else:
                print(
                    f"  {verdict} {inst.name:<22} ε {_fmt(inst.epsilon)} ({inst.accountant}), "
                    f"PLD {_fmt(inst.epsilon_pld)}, budget {_fmt(inst.max_epsilon)}, {len(inst.rounds)} rounds"
                )
            if inst.signatures:
                sig = inst.signatures
                print(
                    f"       signed by the bank {sig['signed']}/{sig['records']}, countersigned by the consortium "
                    f"{sig['countersigned']}/{sig.get('training_records', sig['records'])} training records; "
                    f"lifetime ε {_fmt(inst.lifetime_epsilon)} over "
                    f"{inst.lifetime_runs} run(s)"
                )
            if inst.empirical:
                emp = inst.empirical
                print(
                    f"       empirical ε ≥ {emp['epsilon_lower_bound']:.3f} at confidence {1 - emp['beta']:.2f} "
                    f"(black-box {emp['black_box_epsilon']:.3f}: {emp['black_box']['v']}/{emp['black_box']['r']} "
                    f"correct; white-box {emp['white_box_epsilon']:.3f}: {emp['white_box']['v']}/"
                    f"{emp['white_box']['r']}; {emp['black_box']['m']} canaries); claimed ε for that run "
                    f"{_fmt(emp['claimed_epsilon'])}"
                )
            for problem in inst.tampering + inst.findings:
                print(f"       {problem}")
            for note in inst.notes:
                print(f"       note: {note}")
        for problem in audit.consortium_problems:
            print(f"  FAIL consortium: {problem}")
        if audit.institution_dp:
            dp = audit.institution_dp
            print(
                f"  institution-level DP (a separate, per-institution guarantee): ε {_fmt(dp['epsilon_recorded'])} "
                f"at δ = {dp['delta']:g} (PLD {_fmt(dp['epsilon_pld_independent'])})"
            )
        if reports:
            print(f"Reports: {reports[0].parent}")
        print(f"{'PASSED' if audit.passed else 'FAILED'} (took {time.time() - process_started():.1f} s)")
    if not audit.passed:
        if args.json:
            print("audit failed: see 'tampering' and 'findings' in the JSON", file=sys.stderr)
        return EXIT_AUDIT_FAILED
    return 0
