"""The same federation written as a plain Flower + Opacus app, the way Flower's own Opacus example does it.

Per message, each client loads its data, builds the model, creates a new PrivacyEngine and makes the model
private with Opacus' hooks; it reports the ε of that engine (one round's, not the run's). The server is Flower's
FedAvg over the whole model. Default client resources (2 CPUs per client). Same data, model, DP mechanism and
rounds as `fedchurn simulate` on the same config: only the engineering differs.

Used by benchmarks/federation.py; not part of the product.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.config import FedChurnConfig
from shared.data import institution_names, prepare_institution
from shared.metrics import roc_auc
from shared.model import build_model

REFERENCE_CLIENT_RESOURCES = {"num_cpus": 2, "num_gpus": 0.0}  # Flower's default client resources


def _load(config: FedChurnConfig, context: Context) -> Any:
    names = institution_names(config.data, seed=config.seed)
    return prepare_institution(config, names[int(context.node_config["partition-id"])])


def make_reference_apps(config: FedChurnConfig, results: dict[str, Any]) -> tuple[ServerApp, ClientApp]:
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        data = _load(config, context)  # loaded again for every message, as in the example
        model = build_model(config.model, input_dim=data.x_train.shape[1])
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loader = DataLoader(
            TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)),
            batch_size=config.training.batch_size,
            shuffle=True,
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=config.training.learning_rate)
        engine = PrivacyEngine(secure_mode=False)  # a new engine every round: its ε is this round's only
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
        epsilon = engine.get_epsilon(config.privacy.delta)
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
        width = prepare_institution(config, names[0]).x_train.shape[1]
        model = build_model(config.model, input_dim=width)
        strategy = FedAvg(min_train_nodes=len(names), min_evaluate_nodes=len(names), min_available_nodes=len(names))
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=config.rounds,
            train_config=ConfigRecord({}),
        )
        last = max(result.evaluate_metrics_clientapp)
        results["mean_auc"] = float(result.evaluate_metrics_clientapp[last]["auc"])
        results["reported_epsilon"] = float(result.train_metrics_clientapp[last]["epsilon"])

    return server, client
