"""Whole-run speed of `fedchurn simulate` against a plain Flower + Opacus app, on the data users bring.

    python -m benchmarks.federation                              # both paths, 1 pair each, plus the floor
    python -m benchmarks.federation --paths csv --pairs 3        # the one-CSV path, 3 alternating pairs
    python -m benchmarks.federation --big                        # 1,000 x 10,000 rows (Parquet): one DP round

Two data paths, each 100 institutions x 2,500 rows, DP-SGD (the default σ, C, δ, batch size), 5 rounds:
  synthetic  the seeded synthetic consortium (10 numeric + 5 categorical columns)
  csv        one pooled CSV (benchmarks/make_table.py: 12 numeric columns), read as the ``--data`` quick start
             reads it (schema inference, then the data stage)
For each pair, the reference (benchmarks/reference_app.py: one CPU per client, data loaded once per worker,
accountant carried across rounds) and fedchurn run one after the other on the same config, and the pair prints:
whole-run time, data stage (fedchurn: inference + one read, checks and partitions; the reference loads inside
its workers, so its loading is in its round 1), start-up (run time not spent in rounds: Ray, Flower, workers),
round 1 vs the median of later rounds, the ratio, and ε and mean AUC of both. The compute floor is the same DP
training (vectorised DP-SGD, encoder averaged each round) in this one process, without Flower or Ray.

Targets (2 cores): whole run >= 3x faster than the reference at the same ε and AUC; data stage < 3 s; round 1
within 1.5x of later rounds; start-up < 8 s; 1,000 x 10,000 rows completes a DP round under 8 GiB peak memory
(process tree: this process, Ray's daemons and workers, sampled every 0.2 s from /proc).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.make_table import INSTITUTION, LABEL, write_table
from fedchurn.shared.config import FedChurnConfig, SyntheticConfig, default_config
from fedchurn.simulation.driver import discard_plan, plan_simulation, quiet_environment, run_simulation


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


# --------------------------------------------------------------------------------------------------
# Configs for the two data paths
# --------------------------------------------------------------------------------------------------


def synthetic_config(institutions: int, rows: int, rounds: int, out: Path) -> FedChurnConfig:
    base = default_config()
    synthetic = SyntheticConfig(institutions=institutions, min_rows=rows, max_rows=rows)
    data = dataclasses.replace(base.data, synthetic=synthetic)
    return dataclasses.replace(base, rounds=rounds, output_dir=str(out), data=data)


def csv_config(path: Path, rounds: int, out: Path) -> tuple[FedChurnConfig, float]:
    """The config the ``--data`` quick start builds for ``path``, and the inference time."""
    from fedchurn.schema_inference import infer_schema

    started = time.perf_counter()
    schema = infer_schema(path, label=LABEL, institution_column=INSTITUTION).schema
    seconds = time.perf_counter() - started
    base = default_config()
    data = dataclasses.replace(
        base.data, source="csv", csv_path=str(path), institution_column=INSTITUTION, schema=schema
    )
    return dataclasses.replace(base, rounds=rounds, output_dir=str(out), data=data), seconds


# --------------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------------


def _round_figures(rounds: list[float]) -> dict[str, float]:
    later = rounds[1:] or rounds
    return {"round1_s": rounds[0], "later_s": statistics.median(later)}


def run_ours(config: FedChurnConfig, *, inference_s: float = 0.0) -> dict[str, Any]:
    started = time.perf_counter()
    with PeakMemory() as memory:
        plan = plan_simulation(config)
        data_done = time.perf_counter()
        summary = run_simulation(plan)
    wall = time.perf_counter() - started
    rounds = [float(s) for s in summary["seconds_per_round"]]
    metrics = summary["institutions"].values()
    run_s = wall - (data_done - started)
    return {
        "wall_s": wall + inference_s,
        "data_s": inference_s + (data_done - started),
        "startup_s": run_s - sum(rounds),
        **_round_figures(rounds),
        "peak_gib": memory.peak / 2**30,
        # the banks' DP-released AUC (null where the noise left a class empty): what the server sees
        "auc": float(np.mean([m["auc"] for m in metrics if m.get("auc") is not None] or [np.nan])),
        "epsilon": float(max(m["epsilon"] for m in metrics)),
    }


def run_reference(config: FedChurnConfig, institutions: int) -> dict[str, Any]:
    from flwr.simulation import run_simulation as flower_run_simulation

    from benchmarks.reference_app import REFERENCE_CLIENT_RESOURCES, make_reference_apps

    results: dict[str, Any] = {}
    server, client = make_reference_apps(config, results)
    started = time.perf_counter()
    with PeakMemory() as memory:
        flower_run_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=institutions,
            backend_config={"client_resources": REFERENCE_CLIENT_RESOURCES},  # type: ignore[typeddict-item,dict-item]
        )
    wall = time.perf_counter() - started
    marks = results["marks"]
    rounds = [b - a for a, b in itertools.pairwise(marks)]
    return {
        "wall_s": wall,
        "data_s": float("nan"),  # inside its workers: part of its round 1
        "startup_s": wall - sum(rounds),
        **_round_figures(rounds),
        "peak_gib": memory.peak / 2**30,
        "auc": results["mean_auc"],
        "epsilon": results["max_epsilon"],
    }


def compute_floor(config: FedChurnConfig) -> dict[str, float]:
    """The same DP training in this one process: no Flower, no Ray, no files between rounds."""
    from fedchurn.clients.metrics import roc_auc
    from fedchurn.clients.prepared_institution import prepare_institution
    from fedchurn.clients.training import train_locally
    from fedchurn.shared.bank_random import derive_seed
    from fedchurn.shared.institution_rows import institution_names
    from fedchurn.shared.model import build_model
    from fedchurn.shared.partitions import stage_partitions
    from fedchurn.shared.privacy_accounting import AccountantState
    from fedchurn.shared.sharing import load_shared_arrays, outgoing_arrays

    torch.set_num_threads(1)
    started = time.perf_counter()
    if config.data.source == "csv":
        stage_partitions(config.data, config.output_dir)
    names = institution_names(config.data, seed=config.seed, output_dir=config.output_dir)
    data = [prepare_institution(config, name) for name in names]
    data_s = time.perf_counter() - started
    torch.manual_seed(0)
    models = [build_model(config.model, input_dim=len(d.feature_names)) for d in data]
    accountants = [AccountantState(accountant=config.privacy.accountant) for _ in data]
    encoder = outgoing_arrays(models[0], mode="finetune")
    started = time.perf_counter()
    epsilon = 0.0
    for server_round in range(1, config.rounds + 1):
        sent: list[tuple[dict[str, np.ndarray], int]] = []
        for i, (model, d) in enumerate(zip(models, data, strict=True)):
            load_shared_arrays(model, encoder, mode="finetune")
            report = train_locally(
                model,
                d.x_train,
                d.y_train,
                training=config.training,
                privacy=config.privacy,
                accountant=accountants[i],
                noise_multiplier=config.privacy.noise_multiplier or 1.0,
                seed=derive_seed(config.seed, d.name, server_round, "train"),
            )
            accountants[i] = report.accountant
            epsilon = max(epsilon, report.epsilon)
            sent.append((outgoing_arrays(model, mode="finetune"), len(d.y_train)))
        total = sum(n for _, n in sent)
        encoder = {k: np.sum([arrays[k] * (n / total) for arrays, n in sent], axis=0) for k in sent[0][0]}
    train_s = time.perf_counter() - started
    aucs = []
    for model, d in zip(models, data, strict=True):
        load_shared_arrays(model, encoder, mode="finetune")
        model.eval()
        with torch.no_grad():
            aucs.append(roc_auc(d.y_test, torch.sigmoid(model(torch.from_numpy(d.x_test))).numpy()))
    return {"data_s": data_s, "train_s": train_s, "epsilon": epsilon, "auc": float(np.mean(aucs))}


# --------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------


def _line(who: str, r: dict[str, Any]) -> str:
    data = "   (in r1)" if np.isnan(r["data_s"]) else f"{r['data_s']:>10.2f}"
    return (
        f"    {who:<10} {r['wall_s']:>8.1f} {data} {r['startup_s']:>10.1f} {r['round1_s']:>8.2f} "
        f"{r['later_s']:>8.2f} {r['round1_s'] / r['later_s']:>7.2f} {r['peak_gib']:>8.2f} {r['epsilon']:>7.3f} "
        f"{r['auc']:>6.3f}"
    )


def _verdicts(ours: list[dict[str, Any]], ratios: list[float]) -> str:
    def check(ok: bool) -> str:
        return "met" if ok else "NOT met"

    data = max(o["data_s"] for o in ours)
    startup = max(o["startup_s"] for o in ours)
    r1 = max(o["round1_s"] / o["later_s"] for o in ours)
    ratio = statistics.mean(ratios) if ratios else float("nan")
    return (
        f"    targets: whole run >= 3x: {ratio:.2f}x {check(ratio >= 3)}; data stage < 3 s: {data:.2f} s "
        f"{check(data < 3)}; round 1 <= 1.5x later: {r1:.2f}x {check(r1 <= 1.5)}; start-up < 8 s: "
        f"{startup:.1f} s {check(startup < 8)}"
    )


def pairs(path_name: str, args: argparse.Namespace, tmp: Path) -> None:
    header = (
        f"    {'':<10} {'whole s':>8} {'data s':>10} {'start-up s':>10} {'round1 s':>8} {'later s':>8} "
        f"{'r1/later':>7} {'peak GiB':>8} {'ε':>7} {'AUC':>6}"
    )
    print(f"\n{path_name}: {args.institutions} institutions x {args.rows} rows, {args.rounds} DP rounds", flush=True)
    table: Path | None = None
    if path_name == "csv":
        table = write_table(tmp / "pooled.csv", institutions=args.institutions, rows=args.rows)
    ours_all: list[dict[str, Any]] = []
    ratios: list[float] = []
    config: FedChurnConfig | None = None
    for pair in range(1, args.pairs + 1):
        out = tmp / f"{path_name}-{pair}"
        inference_s = 0.0
        if table is not None:
            config, inference_s = csv_config(table, args.rounds, out / "ours")
        else:
            config = synthetic_config(args.institutions, args.rows, args.rounds, out / "ours")
        reference = run_reference(dataclasses.replace(config, output_dir=str(out / "reference")), args.institutions)
        ours = run_ours(config, inference_s=inference_s)
        ours_all.append(ours)
        ratio = reference["wall_s"] / ours["wall_s"]
        ratios.append(ratio)
        print(f"  pair {pair}: reference / fedchurn = {ratio:.2f}x", flush=True)
        print(header)
        print(_line("reference", reference))
        print(_line("fedchurn", ours), flush=True)
    if config is not None and args.floor:
        floor = compute_floor(dataclasses.replace(config, output_dir=str(tmp / f"{path_name}-floor")))
        print(
            f"  compute floor (one process, no Flower/Ray): training {floor['train_s']:.1f} s for {args.rounds} "
            f"rounds ({floor['train_s'] / args.rounds:.2f} s/round), data {floor['data_s']:.2f} s, "
            f"ε {floor['epsilon']:.3f}, AUC {floor['auc']:.3f}",
            flush=True,
        )
    if ours_all:
        print(_verdicts(ours_all, ratios), flush=True)


def big_round(args: argparse.Namespace, tmp: Path) -> None:
    """1,000 institutions x 10,000 rows in one Parquet file: the data stage and one DP round, peak memory."""
    path = tmp / "big.parquet"
    started = time.perf_counter()
    write_table(path, institutions=args.big_institutions, rows=args.big_rows)
    print(
        f"\nbig: wrote {args.big_institutions} x {args.big_rows} rows ({path.stat().st_size / 2**20:.0f} MiB) in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )
    config, inference_s = csv_config(path, 1, tmp / "big-run")
    with PeakMemory() as memory:
        started = time.perf_counter()
        plan = plan_simulation(config)
        data_s = time.perf_counter() - started
        stage_peak = memory.peak
        if args.big_data_only:
            discard_plan(plan)
            summary: dict[str, Any] | None = None
        else:
            summary = run_simulation(plan)
    wall = time.perf_counter() - started
    print(
        f"big: inference {inference_s:.1f} s, data stage {data_s:.1f} s (peak {stage_peak / 2**30:.2f} GiB)"
        + (
            f", one DP round {summary['seconds_per_round'][0]:.1f} s, whole {wall:.1f} s"
            if summary is not None
            else " (round not run: --big-data-only)"
        )
        + f"; peak memory {memory.peak / 2**30:.2f} GiB (target < 8 GiB: "
        + ("met" if memory.peak < 8 * 2**30 else "NOT met")
        + ")",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", choices=("synthetic", "csv"), default=["synthetic", "csv"])
    parser.add_argument("--institutions", type=int, default=100)
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=1, help="reference/fedchurn pairs per path")
    parser.add_argument("--no-floor", dest="floor", action="store_false", help="skip the one-process floor")
    parser.add_argument("--big", action="store_true", help="only the 1,000 x 10,000 rows run (one DP round)")
    parser.add_argument("--big-institutions", type=int, default=1000)
    parser.add_argument("--big-rows", type=int, default=10_000)
    parser.add_argument("--big-data-only", action="store_true", help="with --big: stop after the data stage")
    args = parser.parse_args()
    quiet_environment()
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} (other work on the machine skews times)")
    with tempfile.TemporaryDirectory(prefix="fedchurn-bench-") as folder:
        tmp = Path(folder)
        if args.big:
            big_round(args, tmp)
            return
        for path_name in args.paths:
            pairs(path_name, args, tmp)


if __name__ == "__main__":
    main()
