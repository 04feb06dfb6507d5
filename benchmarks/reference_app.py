"""The same federation written as a plain Flower 1.42 + Opacus app, done right.

What a careful engineer writes with Flower and Opacus alone:

- one CPU per client (Flower's default of two idles half of a small machine);
- data loaded once per worker: a worker reads the table the first time it needs it (one pyarrow read of the
  pooled file, or the synthetic generator) and keeps each institution's prepared arrays;
- the privacy accountant carried across rounds in the node's ``context.state``, so the ε it reports is the whole
  run's, comparable with fedchurn's;
- Opacus' PrivacyEngine with its per-sample hooks, Adam, Flower's FedAvg over the whole model.

Same data, split, preprocessing, model, DP mechanism (σ, C, batch size, Poisson sampling) and rounds as
``fedchurn simulate`` on the same config: only the engineering differs. Used by benchmarks/federation.py.
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedchurn.clients.metrics import roc_auc
from fedchurn.clients.prepared_institution import PreparedInstitution, prepare_institution
from fedchurn.clients.preprocessor import Preprocessor
from fedchurn.clients.splits import split_institution
from fedchurn.shared.bank_random import derive_seed
from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.institution_file import columns_to_read
from fedchurn.shared.institution_rows import institution_names
from fedchurn.shared.model import build_model
from fedchurn.shared.table_checks import check_rows, institution_codes
from fedchurn.shared.table_io import ColumnTable, read_columns, read_header

REFERENCE_CLIENT_RESOURCES = {"num_cpus": 1, "num_gpus": 0.0}
warnings.filterwarnings("ignore", message="Secure RNG turned off")  # Opacus' reminder, once per engine

# Per worker process: the pooled table (read once) and each institution's prepared arrays.
_TABLE: dict[str, tuple[ColumnTable, list[str], np.ndarray]] = {}
_PREPARED: dict[str, PreparedInstitution] = {}
_NAMES: dict[str, list[str]] = {}


def _prepare_from_pooled(config: FedChurnConfig, name: str) -> PreparedInstitution:
    data = config.data
    schema = data.schema
    if schema is None or data.csv_path is None or data.institution_column is None:
        raise ValueError("the reference app reads one pooled table (data.csv_path + data.institution_column)")
    path = data.csv_path
    if path not in _TABLE:
        header = read_header(path)
        column = data.institution_column
        columns, roles, _ = columns_to_read(header, schema, require_label=True, institution_column=column)
        table = read_columns(path, columns, roles=roles)
        values, codes = institution_codes(table, data.institution_column)
        _TABLE[path] = (table, values, codes)
    table, values, codes = _TABLE[path]
    rows = table.take(np.flatnonzero(codes == values.index(name)))
    checked = check_rows(
        rows, schema, institution=name, missing_values=data.missing_values, require_label=True, has_label=True
    )
    raw = checked.to_raw_table(schema, institution=name, source=path)
    split = split_institution(
        raw,
        validation_fraction=data.validation_fraction,
        test_fraction=data.test_fraction,
        key=str(derive_seed("split", config.seed, name)).encode(),  # a plain app: a split key from the seed
    )
    pre = Preprocessor.fit(split.train)

    def labels(part: Any) -> np.ndarray:
        if part.labels is None:  # split_institution refuses unlabelled tables
            raise ValueError(f"institution {name!r} has no labels")
        return np.asarray(part.labels, dtype=np.float32)

    return PreparedInstitution(
        name=name,
        feature_names=pre.feature_names,
        x_train=pre.transform(split.train),
        y_train=labels(split.train),
        x_val=pre.transform(split.validation),
        y_val=labels(split.validation),
        x_test=pre.transform(split.test),
        y_test=labels(split.test),
        preprocessor=pre,
    )


def _load(config: FedChurnConfig, context: Context) -> PreparedInstitution:
    if "names" not in _NAMES:
        _NAMES["names"] = institution_names(config.data, seed=config.seed)
    names = _NAMES["names"]
    name = names[int(context.node_config["partition-id"])]
    if name not in _PREPARED:
        if config.data.source == "csv" and config.data.csv_path:
            _PREPARED[name] = _prepare_from_pooled(config, name)
        else:
            _PREPARED[name] = prepare_institution(config, name)
    return _PREPARED[name]


def make_reference_apps(config: FedChurnConfig, results: dict[str, Any]) -> tuple[ServerApp, ClientApp]:
    client = ClientApp()
    torch.set_num_threads(1)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        data = _load(config, context)
        model = build_model(config.model, input_dim=data.x_train.shape[1])
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loader = DataLoader(
            TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)),
            batch_size=config.training.batch_size,
            shuffle=True,
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=config.training.learning_rate)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        # The accountant's history from earlier rounds, kept in the node's state: ε is the whole run's.
        saved = context.state.config_records.get("accountant")
        if saved is not None:
            engine.accountant.history = [tuple(h) for h in json.loads(str(saved["history"]))]
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=config.privacy.noise_multiplier,
            max_grad_norm=config.privacy.clipping_norm,
        )
        loss_fn = nn.BCEWithLogitsLoss()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(config.training.local_epochs):
                for xb, yb in private_loader:
                    private_optimizer.zero_grad()
                    logits = private_model(xb)
                    loss = loss_fn(logits, yb) if len(yb) else logits.sum() * 0.0
                    loss.backward()
                    private_optimizer.step()
        accountant: RDPAccountant = engine.accountant  # type: ignore[assignment]
        context.state.config_records["accountant"] = ConfigRecord({"history": json.dumps(accountant.history)})
        epsilon = accountant.get_epsilon(config.privacy.delta)
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": len(data.y_train), "epsilon": epsilon}),
            }
        )
        return Message(content=content, reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        data = _load(config, context)
        model = build_model(config.model, input_dim=data.x_test.shape[1])
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            scores = torch.sigmoid(model(torch.from_numpy(data.x_test))).numpy()
        auc = roc_auc(data.y_test, scores)
        return Message(
            content=RecordDict({"metrics": MetricRecord({"num-examples": len(data.y_test), "auc": auc})}),
            reply_to=msg,
        )

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(config.seed)
        names = institution_names(config.data, seed=config.seed)
        width = len(config.data.schema.feature_names) if config.data.schema else None
        if width is None:
            width = prepare_institution(config, names[0]).x_train.shape[1]
        model = build_model(config.model, input_dim=width)
        strategy = FedAvg(min_train_nodes=len(names), min_evaluate_nodes=len(names), min_available_nodes=len(names))
        marks: list[float] = []

        def mark(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            marks.append(time.perf_counter())  # round 0: before the first round; round k: after round k
            return None

        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=config.rounds,
            train_config=ConfigRecord({}),
            evaluate_fn=mark,
        )
        last = max(result.evaluate_metrics_clientapp)
        results["mean_auc"] = float(result.evaluate_metrics_clientapp[last]["auc"])
        results["max_epsilon"] = float(result.train_metrics_clientapp[last]["epsilon"])
        results["marks"] = marks

    return server, client
