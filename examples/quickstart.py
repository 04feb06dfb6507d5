"""Quick start from Python (a script, or paste it into a notebook cell by cell).

A tiny synthetic consortium (3 banks, 2 rounds, a few hundred customers each) trained with DP-SGD on a local Ray,
then its results as pandas data frames, the same run loaded back from its folder, and each bank's split exported.

    python examples/quickstart.py [OUTPUT_FOLDER]

Overrides are keyword arguments: a config key with its dots spelled ``__`` (``privacy__target_epsilon=3.0`` is
``--set privacy.target_epsilon=3.0`` on the command line); top-level keys as they are (``rounds=2``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import fedchurn


def main(out: Path) -> None:
    import pandas as pd

    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", 12)

    run = fedchurn.simulate(
        None,  # the embedded default config (a YAML path, a mapping or a FedChurnConfig work too)
        output_dir=str(out / "run"),
        rounds=2,
        seed=1,
        data__synthetic__institutions=3,
        data__synthetic__min_rows=300,
        data__synthetic__max_rows=600,
        simulation__ray_num_cpus=2,
    )
    print(run)
    print("\nPer bank, the latest released metrics:")
    print(run.institutions[["institution", "auc", "pr_auc", "brier", "ece", "epsilon", "model_round"]])
    print("\nPer round and bank: σ, ε and the evaluation's metrics:")
    print(run.rounds[["round", "institution", "noise_multiplier", "epsilon", "auc", "ece"]])

    again = fedchurn.load_run(run.run_dir)  # any run folder, finished or stopped, as the same object
    print(f"\nLoaded back: {again}; continue it with fedchurn.simulate(resume={str(run.run_dir)!r}, rounds=4)")

    # The very split each simulated bank trained on: its secret key is in the run folder.
    split = fedchurn.export_split(run.config, out=out / "split")
    print("\nThe split each bank trained on:")
    print(split.files[["institution", "part", "rows", "churned"]])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory(prefix="fedchurn-quickstart-") as folder:
            main(Path(folder))
