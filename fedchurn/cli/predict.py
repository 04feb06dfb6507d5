"""`fedchurn predict`: score new customers with one institution's encoder, head and preprocessing."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "predict",
        help="score new customers with an institution's model from a run",
        description="Write each customer's calibrated churn probability and risk decile (10 = highest risk; "
        "thresholds fixed at the bank, so a customer's decile does not depend on the file) with the model the "
        "institution kept (its best round by DP validation score). Columns are checked against the run's schema; "
        "the label column is optional: when present, AUC, Brier score, ECE and a calibration table are printed.",
    )
    parser.add_argument("--run", required=True, metavar="DIR", help="output folder of a fedchurn simulate run")
    parser.add_argument("--institution", required=True, help="whose head and preprocessing to use")
    parser.add_argument("--input", required=True, metavar="CSV", help="customers to score")
    parser.add_argument("--output", required=True, metavar="CSV", help="scores (never the input file)")
    parser.add_argument("--id-column", help="column to copy to the output (default: a dropped id column, if any)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedchurn.scoring import score_customers

    result = score_customers(
        args.run, args.institution, args.input, args.output, id_column=args.id_column, overwrite=args.overwrite
    )
    kept = f", id column {result.id_column!r} kept" if result.id_column else ""
    model = (
        f"the model it kept from round {result.model_round}, calibrated"
        if result.calibrated
        else "the run's final model (no kept model: probabilities NOT calibrated, deciles ranked within the file)"
    )
    print(
        f"Scored {result.rows} customers with {args.institution}'s model ({model}; mean churn probability "
        f"{result.mean_probability:.3f}{kept}): {result.output}"
    )
    if result.metrics is not None:
        m = result.metrics
        print(
            f"Labels found: AUC {m['auc']:.3f}  Brier {m['brier']:.4f}  ECE {m['ece']:.4f}  "
            f"mean probability {m['mean_probability']:.3f} vs churn rate {m['churn_rate']:.3f} ({int(m['rows'])} rows)"
        )
        print(f"  {'probability':<13} {'rows':>6} {'mean predicted':>14} {'churn rate':>10}")
        for row in result.calibration:
            print(
                f"  [{row['low']:.1f}, {row['high']:.1f}){'':<3} {int(row['count']):>6} "
                f"{row['mean_probability']:>14.3f} {row['churn_rate']:>10.3f}"
            )
    return 0
