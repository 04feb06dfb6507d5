"""On a CUDA machine: institutions train on the GPU, and share one through fractional Ray resources.

Run with `python -m pytest -q -m gpu` where a GPU is present; skipped elsewhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fedchurn.shared.config import SyntheticConfig, apply_overrides, default_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _config(tmp_path: Path, **overrides: object):
    base = default_config()
    data = dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=4, min_rows=600, max_rows=1200))
    config = dataclasses.replace(base, data=data, rounds=2, output_dir=str(tmp_path / "run"))
    return apply_overrides(config, {"simulation.client_num_gpus": 0.25, **overrides})


def test_an_institution_trains_on_the_gpu_with_the_same_accounting(tmp_path: Path) -> None:
    from flwr.app import RecordDict

    from fedchurn.clients.institution import _device, resolve_institution, train_round
    from fedchurn.server.app import initial_encoder
    from fedchurn.shared.institution_rows import resolve_schema

    results = {}
    for gpus in (0.25, 0.0):
        # The same rows on both: the split key derived from the seed (research switch), not two secret keys.
        config = _config(
            tmp_path / str(gpus), **{"simulation.client_num_gpus": gpus, "privacy.reproducible_noise": True}
        )
        institution = resolve_institution({"partition-id": 0, "num-partitions": 4}, config)
        assert _device(config).type == ("cuda" if gpus else "cpu")
        encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
        results[gpus] = train_round(
            institution, encoder=encoder, server_round=1, proximal_mu=0.0, run_id=1, context_state=RecordDict()
        )
    gpu, cpu = results[0.25], results[0.0]
    assert gpu.metrics["epsilon"] == pytest.approx(cpu.metrics["epsilon"])  # same mechanism, same steps
    assert all(np.isfinite(v).all() for v in gpu.encoder.values())


def test_four_institutions_share_one_gpu_on_ray(tmp_path: Path) -> None:
    from fedchurn.simulation.driver import plan_simulation, run_simulation

    summary = run_simulation(plan_simulation(_config(tmp_path)))
    assert len(summary["institutions"]) == 4
    assert all(m["auc"] > 0.5 for m in summary["institutions"].values())
