"""One institution, ready for training: its rows read, secretly split and transformed by the declared preprocessing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from fedchurn.clients.preprocessor import Preprocessor
from fedchurn.clients.row_identity import file_fingerprint, table_fingerprint
from fedchurn.clients.splits import split_institution
from fedchurn.shared.bank_random import reproducible_key
from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.errors import DataError
from fedchurn.shared.institution_rows import read_institution
from fedchurn.shared.partitions import load_partition
from fedchurn.shared.raw_table import RawTable

logger = logging.getLogger("fedchurn.shared.data")  # one logger for the data pipeline (users filter on it)


@dataclass(frozen=True, eq=False)
class PreparedInstitution:
    name: str
    feature_names: tuple[str, ...]
    x_train: np.ndarray  # float32 (n, len(feature_names))
    y_train: np.ndarray  # float32 0/1 (n,)
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    preprocessor: Preprocessor
    missing_imputed: int = 0  # blank cells filled with declared values (bounds midpoint; all-zero category)
    rows_dropped: int = 0  # rows dropped for blank cells (missing_values="drop")
    source: str = field(default="")  # where the rows came from (file path or "synthetic")
    fingerprint: str = ""  # SHA-256 of the institution's rows (clients/row_identity): its ledger's dataset


def prepare_institution(
    config: FedChurnConfig, institution: str, *, split_key: bytes | None = None
) -> PreparedInstitution:
    """Read, split, and transform the three parts with the schema's declared preprocessing.

    ``split_key`` is the bank's secret key (shared/bank_random.bank_secret_key). Without one (offline tools,
    research) the key is derived from the config's seed and the institution's name: a split the server can know.
    """
    data = config.data
    staged = load_partition(data, config.output_dir, institution) if data.source == "csv" else None
    table = staged if staged is not None else read_institution(data, institution, seed=config.seed)
    split = split_institution(
        table,
        validation_fraction=data.validation_fraction,
        test_fraction=data.test_fraction,
        key=split_key if split_key is not None else reproducible_key(config.seed, institution),
    )
    path = data.institution_files.get(institution) if data.source == "csv" else None
    fingerprint = file_fingerprint(path) if path else table_fingerprint(table)
    # Declared bounds and vocabulary only: no statistic of this bank's rows enters any customer's features.
    preprocessor = Preprocessor.from_schema(table.schema)

    def labels(part: RawTable) -> np.ndarray:
        if part.labels is None:  # split_institution refuses unlabelled tables
            raise DataError(f"institution {institution!r} has no labels", path=table.source)
        return part.labels.astype(np.float32)

    prepared = PreparedInstitution(
        name=institution,
        feature_names=preprocessor.feature_names,
        x_train=preprocessor.transform(split.train),
        y_train=labels(split.train),
        x_val=preprocessor.transform(split.validation),
        y_val=labels(split.validation),
        x_test=preprocessor.transform(split.test),
        y_test=labels(split.test),
        preprocessor=preprocessor,
        missing_imputed=table.n_blank,
        rows_dropped=table.rows_dropped,
        source=table.source,
        fingerprint=fingerprint,
    )
    logger.info(
        "%s: %d train / %d validation / %d test rows, %d features, churn rate %.3f",
        institution,
        len(prepared.y_train),
        len(prepared.y_val),
        len(prepared.y_test),
        len(prepared.feature_names),
        table.n_positive / max(table.n_rows, 1),
    )
    return prepared
