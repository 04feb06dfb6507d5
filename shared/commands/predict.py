"""`fedchurn predict`: score new customers with one institution's encoder, head and preprocessing."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "predict",
        help="score new customers with an institution's model from a run",
        description="Write each customer's churn probability and risk decile (10 = highest risk, ranked within "
        "the file). Columns are checked against the run's schema; the label column is optional.",
    )
    parser.add_argument("--run", required=True, metavar="DIR", help="output folder of a fedchurn simulate run")
    parser.add_argument("--institution", required=True, help="whose head and preprocessing to use")
    parser.add_argument("--input", required=True, metavar="CSV", help="customers to score")
    parser.add_argument("--output", required=True, metavar="CSV", help="scores (never the input file)")
    parser.add_argument("--id-column", help="column to copy to the output (default: a dropped id column, if any)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from shared.scoring import score_customers

    result = score_customers(
        args.run, args.institution, args.input, args.output, id_column=args.id_column, overwrite=args.overwrite
    )
    kept = f", id column {result.id_column!r} kept" if result.id_column else ""
    print(
        f"Scored {result.rows} customers with {args.institution}'s model (mean churn probability "
        f"{result.mean_probability:.3f}{kept}): {result.output}"
    )
    return 0
