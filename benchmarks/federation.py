"""Federation throughput: start-up, time per round and peak memory, and the ratio to a plain Flower + Opacus app.

    python benchmarks/federation.py                         # 10 and 100 institutions; 100 vs the reference
    python benchmarks/federation.py --institutions 1000 --rounds 2 --pairs 0
    python benchmarks/federation.py --institutions 100 --rounds 5 --pairs 2   # the 3x target

Every institution has 2,000 rows (synthetic consortium), DP-SGD with the default σ, C, δ and batch size.
Peak memory is the largest resident set of the whole process tree (this process, Ray's daemons and workers),
sampled every 0.2 s from /proc. With --pairs K, the reference app (benchmarks/reference_app.py: a new
PrivacyEngine every round, data loaded per message, Opacus hooks, Flower's default client resources) and
`fedchurn simulate` run alternately K times on the same config, and each pair's time ratio is printed,
with both runs' AUC and ε.

Target (2 cores, 100 institutions x 2,000 rows, DP, 5 rounds): at least 3x faster than the reference at the same
ε and AUC; 1,000 institutions x 2,000 rows within 24 GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shared.config import FedChurnConfig, SyntheticConfig, default_config
from shared.data import institution_names, prepare_institution
from shared.privacy import compute_epsilon, sample_rate_for
from shared.simulation import plan_simulation, quiet_environment, run_simulation


class PeakMemory:
    """Samples the resident memory of this process and all its descendants."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(os.getpid()))
            self._stop.wait(self.interval)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(parent, []).append(int(entry))
    return tree


def _tree_rss(root: int) -> int:
    tree = _children()
    total, stack = 0, [root]
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        stack.extend(tree.get(pid, []))
    return total


def _config(institutions: int, rows: int, rounds: int, out: Path) -> FedChurnConfig:
    base = default_config()
    synthetic = SyntheticConfig(institutions=institutions, min_rows=rows, max_rows=rows)
    return dataclasses.replace(
        base, rounds=rounds, output_dir=str(out), data=dataclasses.replace(base.data, synthetic=synthetic)
    )


def run_ours(config: FedChurnConfig) -> dict[str, Any]:
    started = time.perf_counter()
    with PeakMemory() as memory:
        summary = run_simulation(plan_simulation(config))
    wall = time.perf_counter() - started
    rounds = summary["seconds_per_round"]
    aucs = [m["auc"] for m in summary["institutions"].values()]
    epsilons = [m["epsilon"] for m in summary["institutions"].values()]
    return {
        "wall_s": wall,
        "startup_s": wall - sum(rounds),
        "round_s": sum(rounds) / len(rounds),
        "peak_gib": memory.peak / 2**30,
        "mean_auc": sum(aucs) / len(aucs),
        "max_epsilon": max(epsilons),
    }


def run_reference(config: FedChurnConfig) -> dict[str, Any]:
    from flwr.simulation import run_simulation as flower_run_simulation

    from benchmarks.reference_app import REFERENCE_CLIENT_RESOURCES, make_reference_apps

    results: dict[str, Any] = {}
    server, client = make_reference_apps(config, results)
    started = time.perf_counter()
    with PeakMemory() as memory:
        flower_run_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=config.data.synthetic.institutions,
            backend_config={"client_resources": REFERENCE_CLIENT_RESOURCES},  # type: ignore[typeddict-item]
        )
    return {"wall_s": time.perf_counter() - started, "peak_gib": memory.peak / 2**30, **results}


def true_epsilon(config: FedChurnConfig) -> float:
    """The run's ε for the largest sample rate: what both apps' mechanisms compose to over all rounds."""
    names = institution_names(config.data, seed=config.seed)
    n_train = min(len(prepare_institution(config, name).y_train) for name in names[:5])
    q = sample_rate_for(dataset_size=n_train, batch_size=config.training.batch_size)
    steps = round(1 / q) * config.training.local_epochs * config.rounds
    return compute_epsilon(
        noise_multiplier=config.privacy.noise_multiplier or 0.0, sample_rate=q, steps=steps, delta=config.privacy.delta
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--institutions", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=1, help="reference/ours pairs at the largest size (0: none)")
    args = parser.parse_args()
    quiet_environment()

    print(f"{'institutions':>12} {'rows':>5} {'rounds':>6} {'start-up s':>10} {'s/round':>8} {'peak GiB':>8} "
          f"{'wall s':>7} {'mean AUC':>8} {'max ε':>6}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fedchurn-bench-") as tmp:
        for count in args.institutions:
            config = _config(count, args.rows, args.rounds, Path(tmp) / f"ours-{count}")
            result = run_ours(config)
            print(
                f"{count:>12} {args.rows:>5} {args.rounds:>6} {result['startup_s']:>10.1f} {result['round_s']:>8.2f} "
                f"{result['peak_gib']:>8.2f} {result['wall_s']:>7.1f} {result['mean_auc']:>8.3f} "
                f"{result['max_epsilon']:>6.3f}",
                flush=True,
            )
        if args.pairs <= 0:
            return
        count = max(args.institutions)
        print(f"\nPlain Flower + Opacus reference vs fedchurn, {count} institutions, alternating:")
        ratios = []
        for pair in range(1, args.pairs + 1):
            config = _config(count, args.rows, args.rounds, Path(tmp) / f"pair-{pair}")
            reference = run_reference(config)
            ours = run_ours(config)
            ratio = reference["wall_s"] / ours["wall_s"]
            ratios.append(ratio)
            print(
                f"  pair {pair}: reference {reference['wall_s']:.1f} s (AUC {reference['mean_auc']:.3f}, "
                f"peak {reference['peak_gib']:.2f} GiB, reports per-round ε {reference['reported_epsilon']:.3f}) | "
                f"fedchurn {ours['wall_s']:.1f} s (AUC {ours['mean_auc']:.3f}, peak {ours['peak_gib']:.2f} GiB, "
                f"cumulative ε {ours['max_epsilon']:.3f}) | ratio {ratio:.2f}x",
                flush=True,
            )
        expected = true_epsilon(config)
        print(
            f"  same mechanism (σ, C, q, steps, rounds) in both: cumulative ε of the run = {expected:.3f} "
            f"(fedchurn reports {ours['max_epsilon']:.3f}; the reference reports one round's ε only)"
        )
        mean_ratio = sum(ratios) / len(ratios)
        verdict = "met" if mean_ratio >= 3.0 else "NOT met"
        print(f"  mean speed-up {mean_ratio:.2f}x (target >= 3x: {verdict})")


if __name__ == "__main__":
    main()
