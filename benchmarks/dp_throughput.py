"""DP training throughput: rows per second of one institution's local training, with and without DP.

For each table size and batch size, times the same model three ways on the same rows:
  plain      no DP: shuffled mini-batches, plain optimizer
  opacus     DP-SGD through Opacus' per-sample gradient hooks
  vectorized the same DP-SGD mechanism with exact per-row norms for MLPs (the default)
and prints rows/s and the ratios DP/plain. Each measurement runs up to --max-steps optimizer steps (or one
epoch, if shorter) after a short warm-up; rows/s counts the rows actually in the batches.

    python benchmarks/dp_throughput.py                       # 10k, 100k, 1M rows x batch 64, 256, 1024
    python benchmarks/dp_throughput.py --rows 10000 --batch-sizes 256 --max-steps 100

Target (2-core CPU): DP within 2x of the plain time for the same model.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedchurn.clients.private_training import make_private
from fedchurn.shared.config import default_config
from fedchurn.shared.model import build_model
from fedchurn.shared.privacy_accounting import AccountantState
from fedchurn.shared.synthetic_consortium import SYNTHETIC_SCHEMA


def _table(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Model speed does not depend on the values; a standardised random table of the synthetic schema's width.
    rng = np.random.default_rng(seed)
    width = len(SYNTHETIC_SCHEMA.feature_names)
    x = rng.standard_normal((rows, width)).astype(np.float32)
    y = (rng.random(rows) < 0.2).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def _shuffled_batches(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, generator: torch.Generator) -> object:
    # The fastest plain loop: one permutation, then slices (DataLoader's per-row collate would flatter DP).
    order = torch.randperm(len(y), generator=generator)
    return ((x[i], y[i]) for i in order.split(batch_size))


def _time_steps(mode: str, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, max_steps: int) -> tuple[float, int]:
    torch.manual_seed(0)
    model = build_model(default_config().model, input_dim=x.shape[1])
    optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    loader: object = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=generator)
    module: nn.Module = model
    if mode == "plain":
        loader = _shuffled_batches(x, y, batch_size=batch_size, generator=generator)
    else:
        private = make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,  # type: ignore[arg-type]
            noise_multiplier=1.0,
            clipping_norm=1.0,
            state=AccountantState(accountant="rdp"),
            generator=generator,
            implementation=mode,
        )
        module, optimizer, loader = private.module, private.optimizer, private.data_loader
    loss_fn = nn.BCEWithLogitsLoss()
    rows = 0
    steps = 0
    warmup = 5
    started = 0.0
    for xb, yb in loader:  # type: ignore[attr-defined]
        if steps == warmup:
            started = time.perf_counter()
            rows = 0
        optimizer.zero_grad()
        logits = module(xb)
        loss = loss_fn(logits, yb) if len(yb) else logits.sum() * 0.0
        loss.backward()
        optimizer.step()
        rows += len(yb)
        steps += 1
        if steps >= max_steps + warmup:
            break
    elapsed = time.perf_counter() - started
    return rows / elapsed, steps - warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--max-steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one institution = one worker = one thread, as in a simulation
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus' hooks, expected

    print(f"torch {torch.__version__}, 1 thread; model {dataclasses.asdict(default_config().model)}")
    header = f"{'rows':>9} {'batch':>6} {'plain rows/s':>13} {'opacus rows/s':>14} {'vector rows/s':>14}"
    print(header + f" {'opacus/plain':>13} {'vector/plain':>13} {'target<=2x':>10}")
    for rows in args.rows:
        x, y = _table(rows, seed=rows)
        for batch_size in args.batch_sizes:
            steps = min(args.max_steps, max(1, rows // batch_size - 5))
            speed = {m: _time_steps(m, x, y, batch_size=batch_size, max_steps=steps)[0] for m in
                     ("plain", "opacus", "vectorized")}  # fmt: skip
            slow_opacus = speed["plain"] / speed["opacus"]
            slow_vector = speed["plain"] / speed["vectorized"]
            print(
                f"{rows:>9} {batch_size:>6} {speed['plain']:>13,.0f} {speed['opacus']:>14,.0f} "
                f"{speed['vectorized']:>14,.0f} {slow_opacus:>12.2f}x {slow_vector:>12.2f}x "
                f"{'met' if slow_vector <= 2.0 else 'NOT met':>10}",
                flush=True,
            )


if __name__ == "__main__":
    main()
