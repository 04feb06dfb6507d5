"""`fedchurn report RUN_DIR`: (re)write RUN_DIR/report.html for a run or a comparison folder."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "report",
        help="write RUN_DIR/report.html: AUC and ε per round per bank, ε against budgets, calibration",
        description="Write a self-contained, offline HTML report (charts embedded, no script) for the output folder "
        "of a run (summary.json, rounds.jsonl) or of a comparison (comparison.json). 'fedchurn simulate' writes "
        "one at the end of every run; this regenerates it for any existing folder.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the output folder of a run or of 'fedchurn compare'")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedchurn.reporting import write_report

    path = write_report(args.run_dir)
    print(f"Report: {path}")
    return 0
