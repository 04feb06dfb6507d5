"""Local evaluation on the institution's own held-out rows."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedchurn.clients.metrics import binary_metrics
from fedchurn.shared.model import ChurnModel


@torch.no_grad()
def predict_logits(model: ChurnModel, x: np.ndarray, *, batch_size: int = 8192) -> torch.Tensor:
    """Churn logit per row, in row order."""
    model.eval()
    device = next(model.parameters()).device
    parts = [model(torch.from_numpy(x[i : i + batch_size]).to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0)


def predict_probabilities(model: ChurnModel, x: np.ndarray) -> np.ndarray:
    return torch.sigmoid(predict_logits(model, x)).double().numpy()


def evaluate(model: ChurnModel, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """AUC, PR-AUC, Brier score, accuracy and log-loss of ``model`` on (x, y)."""
    logits = predict_logits(model, x).double()
    metrics = binary_metrics(y, torch.sigmoid(logits).numpy())
    metrics["loss"] = float(nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y).double()))
    return metrics
