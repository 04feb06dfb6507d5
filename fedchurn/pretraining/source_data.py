"""Source data for pretraining: a CSV with the federation's schema, or the synthetic consortium's source domain.

The synthetic source domain is a larger population drawn from the same consortium-level churn process as the
banks of ``data.synthetic`` (same seed: same customer behaviour), with its own customer mix, like a public or
pooled data set. Its rows come from their own random stream: no customer of any bank is in it.

Pretraining is not differentially private. The source must be data the consortium may use freely (public, or
consented); an institution's private rows belong in the federation, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedchurn.clients.preprocessor import Preprocessor
from fedchurn.shared.bank_random import derive_seed
from fedchurn.shared.config import FedChurnConfig, SchemaConfig
from fedchurn.shared.errors import ConfigError, DataError
from fedchurn.shared.institution_file import read_csv_table
from fedchurn.shared.institution_rows import resolve_schema
from fedchurn.shared.provenance import array_fingerprint, file_fingerprint
from fedchurn.shared.raw_table import RawTable
from fedchurn.shared.synthetic_consortium import SyntheticProfile, generate_synthetic_rows, synthetic_profile

SOURCE_NAME = "source"


@dataclass(frozen=True, eq=False)
class SourceData:
    """Preprocessed source rows, ready for pretraining."""

    x: np.ndarray  # float32 (n, len(feature_names))
    y: np.ndarray | None  # float32 0/1 (n,), None when unlabelled
    schema: SchemaConfig
    kind: str  # "synthetic" | "csv"
    description: str
    fingerprint: str  # sha256 of the rows used (after preprocessing) and their labels
    file_sha256: str | None = None

    @property
    def n_rows(self) -> int:
        return int(self.x.shape[0])


def synthetic_source_table(config: FedChurnConfig) -> RawTable:
    """The consortium's seeded source domain: ``pretrain.source_rows`` customers, its own mix and churn rate."""
    synthetic = config.data.synthetic
    n_shifts = len(synthetic_profile(synthetic, 0, seed=config.seed).shifts)
    rng = np.random.default_rng(derive_seed("synthetic-source-profile", config.seed))
    profile = SyntheticProfile(
        name=SOURCE_NAME,
        rows=config.pretrain.source_rows,
        churn_rate=0.5 * (synthetic.churn_rate_min + synthetic.churn_rate_max),
        shifts=tuple(float(s) for s in rng.normal(0.0, synthetic.feature_shift, size=n_shifts)),
    )
    table, _ = generate_synthetic_rows(
        profile, seed=config.seed, rows_seed=derive_seed("synthetic-source-rows", config.seed)
    )
    return table


def load_source(config: FedChurnConfig) -> SourceData:
    """Read (or generate) and preprocess the pretraining source; labels are required for the supervised objective."""
    pretrain = config.pretrain
    schema = resolve_schema(config.data)
    need_labels = pretrain.objective == "supervised"
    file_sha: str | None = None
    if pretrain.source == "synthetic":
        if config.data.source != "synthetic":
            raise ConfigError(
                "pretrain.source",
                "synthetic",
                "the synthetic source domain has the synthetic schema, not this federation's",
                "give pretrain.source: csv and pretrain.csv_path with a table of this federation's columns",
            )
        table = synthetic_source_table(config)
        description = f"synthetic source domain, seed {config.seed}, {table.n_rows} rows"
    else:
        path = pretrain.csv_path
        if path is None:  # PretrainConfig refuses this; for configs built by hand
            raise ConfigError("pretrain.csv_path", None, "is required when pretrain.source is 'csv'")
        table = read_csv_table(
            path,
            schema,
            institution=SOURCE_NAME,
            missing_values=config.data.missing_values,
            require_label=need_labels,
        )
        file_sha = file_fingerprint(path)
        description = f"{path} ({table.n_rows} rows)"
    if need_labels and (table.labels is None or table.n_positive in (0, table.n_rows)):
        raise DataError(
            "the supervised objective needs a label column with both classes",
            path=table.source,
            column=schema.label,
            fix="use pretrain.objective: self_supervised for unlabelled source data",
        )
    preprocessor = Preprocessor.fit(table)  # the source standardises itself, as each institution does
    x = preprocessor.transform(table).astype(np.float32)
    y = table.labels.astype(np.float32) if need_labels and table.labels is not None else None
    return SourceData(
        x=x,
        y=y,
        schema=schema,
        kind=pretrain.source,
        description=description,
        fingerprint=array_fingerprint(x, y),
        file_sha256=file_sha,
    )
