"""`fedchurn runs [FOLDER]`: the run folders under FOLDER, what state each is in, and how to continue it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "runs",
        help="list the runs under a folder: status, rounds, AUC, ε, and the command that resumes each",
        description="List the run folders at or under FOLDER (default: the current folder): finished, stopped at "
        "round k of n (interrupted, or still under way) or failed; rounds; the mean of the institutions' latest "
        "test AUC; the range of their ε; when it started; and the command that continues it.",
    )
    parser.add_argument("folder", nargs="?", default=".", metavar="FOLDER", help="where to look (default: .)")
    parser.add_argument("--depth", type=int, default=3, help="how many folder levels down to look (default: 3)")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.set_defaults(handler=run)


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _epsilon(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "n/a"
    return f"{low:.2f}" if abs(high - low) < 0.005 else f"{low:.2f}-{high:.2f}"


def run(args: argparse.Namespace) -> int:
    from fedchurn.api.folders import find_runs, inspect_run

    root = Path(args.folder)
    infos = [inspect_run(path) for path in find_runs(root, depth=args.depth)]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "path": str(i.path),
                        "status": i.status,
                        "status_text": i.status_text,
                        "completed_rounds": i.completed_rounds,
                        "planned_rounds": i.planned_rounds,
                        "run_name": i.run_name,
                        "institutions": i.institutions,
                        "mean_auc": i.mean_auc,
                        "epsilon_min": i.epsilon_min,
                        "epsilon_max": i.epsilon_max,
                        "started": i.started.isoformat() if i.started else None,
                        "resume": i.resume_command,
                    }
                    for i in infos
                ],
                indent=2,
            )
        )
        return 0
    if not infos:
        print(f"No runs under {root} (a run folder holds summary.json, rounds.jsonl or checkpoints/).")
        return 0
    base = root.expanduser().resolve()
    names = [str(i.path.relative_to(base)) if i.path.is_relative_to(base) else str(i.path) for i in infos]
    width = max(12, *(len(n) for n in names))
    header = (
        f"{'run':<{width}}  {'status':<26} {'rounds':>7} {'banks':>5} {'mean AUC':>8} {'ε range':>11}  started (UTC)"
    )
    print(header)
    print("-" * len(header))
    for name, i in zip(names, infos, strict=True):
        rounds = f"{i.completed_rounds}/{i.planned_rounds if i.planned_rounds is not None else '?'}"
        started = i.started.strftime("%Y-%m-%d %H:%M") if i.started else "n/a"
        print(
            f"{name:<{width}}  {i.status_text[:26]:<26} {rounds:>7} {i.institutions:>5} {_number(i.mean_auc):>8} "
            f"{_epsilon(i.epsilon_min, i.epsilon_max):>11}  {started}"
        )
        print(f"{'':<{width}}  {'more rounds' if i.status == 'finished' else 'resume'}: {i.resume_command}")
    print("A run still under way shows as stopped. AUC and ε: each institution's latest released values.")
    return 0
