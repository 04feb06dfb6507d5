"""`fedchurn privacy epsilon|plan`: ε of a DP-SGD history, and the noise multiplier a target ε needs."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

ACCOUNTANT_CHOICES = ("rdp", "prv", "pld")


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """ε: rdp/prv from Opacus' accountants (shared/privacy_accounting), pld from dp-accounting (fedchurn/auditing)."""
    if accountant == "pld":
        from fedchurn.auditing.independent_accounting import pld_epsilon

        return pld_epsilon([(noise_multiplier, sample_rate, steps)], delta=delta)
    from fedchurn.shared.privacy_accounting import compute_epsilon

    return compute_epsilon(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant
    )


def noise_multiplier(*, target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    if accountant == "pld":
        from fedchurn.auditing.independent_accounting import pld_noise_multiplier_for

        return pld_noise_multiplier_for(
            target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps
        )
    from fedchurn.shared.privacy_accounting import noise_multiplier_for

    return noise_multiplier_for(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )


def budget_lines(summary: dict[str, Any]) -> list[str]:
    """The lines `fedchurn simulate` prints about institutions that stopped at their privacy budget."""
    budget = summary.get("budget") or {}
    stopped = budget.get("stopped") or {}
    lines = []
    for name, entry in stopped.items():
        spent = entry.get("epsilon")
        lines.append(
            f"  {name}: stopped before round {entry['round']} at ε = "
            f"{'n/a' if spent is None else f'{spent:.3f}'} (budget {entry['max_epsilon']:g}): {entry['reason']}"
        )
    if lines:
        lines.insert(0, f"{len(lines)} institution(s) stopped at their privacy budget:")
    return lines


# δ is the chance the guarantee fails outright; it must be well below 1/n for a bank of n training rows. Above
# this, ε means little (and Opacus' RDP-to-(ε, δ) conversion even returns ε < 0 near δ = 0.5): refuse.
MAX_DELTA = 1.0e-3


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (give a decimal number, e.g. 1e-5)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number (give a decimal number, e.g. 1e-5)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (give a count such as 100)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text} (give at least one step/round)")
    return value


def _delta(text: str) -> float:
    value = _number(text)
    if not 0.0 < value <= MAX_DELTA:
        raise argparse.ArgumentTypeError(
            f"δ = {text} must be > 0 and <= {MAX_DELTA:g}: δ is the chance the guarantee fails outright and must "
            "be well below 1/n for n training rows (give e.g. --delta 1e-5, at most 1/(10 n))"
        )
    return value


def _noise_multiplier(text: str) -> float:
    value = _number(text)
    if value <= 0.0:
        raise argparse.ArgumentTypeError(
            f"σ = {text} must be > 0: with no noise there is no finite ε (give the run's noise multiplier, e.g. 1.2)"
        )
    return value


def _sample_rate(text: str) -> float:
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"q = {text} must be > 0 and <= 1: it is the chance each row joins a batch (give batch / rows, e.g. "
            "64/3000 = 0.0213)"
        )
    return value


def _target_epsilon(text: str) -> float:
    value = _number(text)
    if value <= 0.0:
        raise argparse.ArgumentTypeError(f"ε = {text} must be > 0 (give the budget for the whole run, e.g. 3)")
    return value


def register(commands: Any) -> None:
    parser = commands.add_parser("privacy", help="privacy accounting: ε of a history, σ for a target ε")
    actions = parser.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")
    eps = actions.add_parser(
        "epsilon",
        help="ε after STEPS Poisson-subsampled Gaussian steps",
        description="ε (per row, add/remove adjacency, Poisson sampling) after --steps DP-SGD steps.",
    )
    eps.add_argument("--noise-multiplier", type=_noise_multiplier, required=True, help="σ (> 0)")
    eps.add_argument(
        "--sample-rate", type=_sample_rate, required=True, help="Poisson sample rate q (batch / rows), in (0, 1]"
    )
    eps.add_argument("--steps", type=_positive_int, required=True, help="DP-SGD steps in total")
    eps.add_argument("--delta", type=_delta, required=True, help=f"δ, in (0, {MAX_DELTA:g}] and well below 1/rows")
    eps.add_argument(
        "--accountant",
        choices=ACCOUNTANT_CHOICES,
        default="rdp",
        help="rdp, prv (Opacus) or pld (Google dp-accounting) (default: rdp)",
    )
    eps.add_argument("--json", action="store_true", help='print {"epsilon": ...}')
    plan = actions.add_parser(
        "plan",
        help="the noise multiplier a target ε needs over a planned run",
        description="The smallest σ whose ε over ROUNDS × STEPS_PER_ROUND steps at sample rate q stays <= the target.",
    )
    plan.add_argument("--target-epsilon", type=_target_epsilon, required=True, help="ε for the whole run (> 0)")
    plan.add_argument("--rounds", type=_positive_int, required=True, help="federated rounds (>= 1)")
    plan.add_argument(
        "--sample-rate", type=_sample_rate, required=True, help="Poisson sample rate q (batch / rows), in (0, 1]"
    )
    plan.add_argument("--steps-per-round", type=_positive_int, required=True, help="local epochs × ceil(rows / batch)")
    plan.add_argument("--delta", type=_delta, required=True, help=f"δ, in (0, {MAX_DELTA:g}] and well below 1/rows")
    plan.add_argument(
        "--accountant",
        choices=ACCOUNTANT_CHOICES,
        default="rdp",
        help="rdp, prv (Opacus) or pld (Google dp-accounting)",
    )
    plan.add_argument(
        "--json", action="store_true", help='print {"noise_multiplier": ..., "epsilon": ..., "steps": ...}'
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.privacy_command == "epsilon":
        value = epsilon(
            noise_multiplier=args.noise_multiplier,
            sample_rate=args.sample_rate,
            steps=args.steps,
            delta=args.delta,
            accountant=args.accountant,
        )
        if args.json:
            print(json.dumps({"epsilon": value if math.isfinite(value) else None}))
        else:
            print(
                f"ε = {value:.6g} at δ = {args.delta:g} ({args.accountant}; σ = {args.noise_multiplier:g}, "
                f"q = {args.sample_rate:g}, {args.steps} steps, Poisson sampling, per row)"
            )
        return 0
    steps = args.rounds * args.steps_per_round
    sigma = noise_multiplier(
        target_epsilon=args.target_epsilon,
        sample_rate=args.sample_rate,
        steps=steps,
        delta=args.delta,
        accountant=args.accountant,
    )
    reached = epsilon(
        noise_multiplier=sigma, sample_rate=args.sample_rate, steps=steps, delta=args.delta, accountant=args.accountant
    )
    if args.json:
        print(json.dumps({"noise_multiplier": sigma, "epsilon": reached, "steps": steps}))
    else:
        print(
            f"noise multiplier σ = {sigma:.4f}: ε = {reached:.4g} <= {args.target_epsilon:g} at δ = {args.delta:g} "
            f"over {args.rounds} rounds × {args.steps_per_round} steps (q = {args.sample_rate:g}, {args.accountant})"
        )
    return 0
