"""Write one pooled customer table (CSV or Parquet) for the data-path benchmarks.

    python -m benchmarks.make_table --institutions 100 --rows 2500 --out /tmp/pooled.csv
    python -m benchmarks.make_table --institutions 1000 --rows 10000 --out /tmp/big.parquet

Columns: ``bank`` (institution, ``bank-0001``...), 12 numeric features ``f01``..``f12`` (6 carry the churn
signal, with per-institution shifts), and ``churned`` (yes/no, about 20 %). Written in chunks of institutions,
so a 10-million-row table needs little memory. Deterministic for --seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

N_FEATURES = 12
LABEL = "churned"
INSTITUTION = "bank"
FEATURES = tuple(f"f{i + 1:02d}" for i in range(N_FEATURES))


def chunk(first: int, count: int, rows: int, rng: np.random.Generator) -> pa.Table:
    n = count * rows
    banks = np.repeat(np.arange(first, first + count), rows)
    shifts = rng.normal(0.0, 0.4, size=(count, N_FEATURES))
    z = rng.standard_normal((n, N_FEATURES)) + np.repeat(shifts, rows, axis=0)
    weights = np.array([0.9, -0.7, 0.6, -0.5, 0.4, 0.3] + [0.0] * (N_FEATURES - 6))
    logit = z @ weights - 1.6
    churned = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    scale = np.array([10.0, 1000.0, 1.0, 50.0, 3.0, 100.0, 1.0, 20.0, 5.0, 1.0, 1000.0, 0.1])
    offset = np.array([40.0, 5000.0, 0.0, 600.0, 2.0, 300.0, 0.0, 30.0, 10.0, 0.0, 20000.0, 0.5])
    values = np.round(z * scale + offset, 2)
    names = np.array([f"bank-{i + 1:04d}" for i in range(first, first + count)], dtype=object)
    columns = {INSTITUTION: pa.array(names[banks - first], pa.string())}
    for j, name in enumerate(FEATURES):
        columns[name] = pa.array(values[:, j])
    columns[LABEL] = pa.array(np.where(churned, "yes", "no"), pa.string())
    return pa.table(columns)


def write_table(path: str | Path, *, institutions: int, rows: int, seed: int = 0, per_chunk: int = 50) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer: pa_csv.CSVWriter | pq.ParquetWriter | None = None
    try:
        for first in range(0, institutions, per_chunk):
            table = chunk(first, min(per_chunk, institutions - first), rows, rng)
            if writer is None:
                if target.suffix.lower() in (".parquet", ".pq"):
                    writer = pq.ParquetWriter(str(target), table.schema)
                else:
                    writer = pa_csv.CSVWriter(str(target), table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--institutions", type=int, default=100)
    parser.add_argument("--rows", type=int, default=2500, help="rows per institution")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="file to write: .csv or .parquet")
    args = parser.parse_args()
    path = write_table(args.out, institutions=args.institutions, rows=args.rows, seed=args.seed)
    print(f"wrote {args.institutions} x {args.rows} rows to {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
