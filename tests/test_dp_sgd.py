"""The vectorised DP-SGD path gives Opacus' mechanism: same clipping, same noise scale, same sampling."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import TensorDataset

from fedchurn.clients.dp_sgd import PoissonBatches, VectorizedDPOptimizer, supports
from fedchurn.shared.config import ModelConfig
from fedchurn.shared.model import build_model


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(encoder_hidden=(16, 8), embedding_dim=4, head_hidden=3), input_dim=6)


def _batch(rows: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=g) * 3, (torch.rand(rows, generator=g) < 0.3).float()


def _opacus_step(model: nn.Module, x, y, *, clip: float, expected: int) -> dict[str, torch.Tensor]:
    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=expected,
    )  # fmt: skip
    optimizer.zero_grad()
    nn.BCEWithLogitsLoss()(wrapped(x), y).backward()
    optimizer.step()
    return {k.removeprefix("_module."): v.detach().clone() for k, v in wrapped.state_dict().items()}


def _vectorized_step(model: nn.Module, x, y, *, clip: float, expected: int) -> dict[str, torch.Tensor]:
    optimizer = VectorizedDPOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, clipping_norm=clip,
        expected_batch_size=expected, generator=None,
    )  # fmt: skip
    optimizer.zero_grad()
    nn.BCEWithLogitsLoss()(model(x), y).backward()
    optimizer.step()
    optimizer.detach()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("clip", [0.05, 1.0, 1e6])  # most rows clipped / some / none
def test_clipped_update_equals_opacus(clip: float) -> None:
    x, y = _batch()
    expected = 40  # Poisson: the expected batch size differs from this batch's 32 rows
    reference = _opacus_step(_model(), x, y, clip=clip, expected=expected)
    ours = _vectorized_step(_model(), x, y, clip=clip, expected=expected)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-7)


def test_no_clipping_no_noise_is_plain_sgd_scaled_by_batch() -> None:
    x, y = _batch()
    plain = _model()
    torch.optim.SGD(plain.parameters(), lr=1.0).zero_grad()
    nn.BCEWithLogitsLoss()(plain(x), y).backward()
    with torch.no_grad():
        for p in plain.parameters():
            p -= p.grad
    ours = _vectorized_step(_model(), x, y, clip=1e9, expected=len(y))
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-7)


def test_per_row_gradient_norm_after_clipping_is_at_most_c() -> None:
    x, y = _batch(rows=1)  # one row: the clipped sum is that row's clipped gradient
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = _vectorized_step(model, x * 100, y, clip=0.5, expected=1)
    norm = math.sqrt(sum(float((before[k] - after[k]).pow(2).sum()) for k in before))
    assert norm == pytest.approx(0.5, rel=1e-4)


def test_noise_std_is_sigma_c_over_expected_batch() -> None:
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    layer = model.head.layers[2]
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    sigma, clip, expected = 1.5, 2.0, 50
    optimizer = VectorizedDPOptimizer(
        model, torch.optim.SGD([layer.weight, layer.bias], lr=0.0), noise_multiplier=sigma, clipping_norm=clip,
        expected_batch_size=expected, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    samples = []
    for _ in range(400):
        optimizer.zero_grad()
        (model(torch.zeros(0, 6)).sum() * 0.0).backward()  # an empty Poisson batch: noise only
        optimizer.step()
        samples.append(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]))
    std = torch.stack(samples).std().item()
    assert std == pytest.approx(sigma * clip / expected, rel=0.05)


def test_poisson_batches_have_rate_q_and_one_over_q_steps() -> None:
    data = TensorDataset(torch.arange(1000).float().unsqueeze(1), torch.zeros(1000))
    batches = PoissonBatches(data, sample_rate=0.05, steps=20, generator=torch.Generator().manual_seed(0))
    sizes = [len(b[0]) for b in batches]
    assert len(sizes) == 20
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 50) < 3 * math.sqrt(1000 * 0.05 * 0.95 / 20)
    assert len({tuple(b[0].flatten().tolist()) for b in batches}) == 20  # fresh draws each step


def test_supports_only_linear_models() -> None:
    assert supports(_model())
    assert not supports(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    assert not supports(nn.Sequential(nn.Conv1d(1, 1, 3)))


def test_make_private_vectorized_accounts_every_step_and_detaches() -> None:
    from torch.utils.data import DataLoader

    from fedchurn.clients.private_training import make_private
    from fedchurn.shared.privacy_accounting import AccountantState, compute_epsilon, epsilon_of

    x, y = _batch(rows=200)
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    restored = AccountantState(accountant="rdp").with_steps(noise_multiplier=1.1, sample_rate=1 / 7, steps=14)
    private = make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.1, clipping_norm=1.0, state=restored, generator=torch.Generator().manual_seed(0),
        implementation="vectorized",
    )  # fmt: skip
    assert private.module is model, "no wrapper: the plain model trains"
    assert private.sample_rate == pytest.approx(1 / 7)  # Opacus' q: 1 / len(loader) = 1 / ceil(200 / 32)
    for _ in range(2):
        for xb, yb in private.data_loader:
            private.optimizer.zero_grad()
            nn.BCEWithLogitsLoss()(private.module(xb), yb).backward()
            private.optimizer.step()
    state = private.finish()
    assert state.total_steps == 14 + 2 * 7
    expected = compute_epsilon(noise_multiplier=1.1, sample_rate=1 / 7, steps=28, delta=1e-5)
    assert epsilon_of(state, delta=1e-5) == pytest.approx(expected, rel=1e-9)
    assert all(not m._forward_hooks for m in model.modules()), "hooks removed after finish"


@pytest.mark.parametrize("rate", [0.01, 0.2])  # sparse (binomial + uniform subset) and dense (one draw per row)
def test_poisson_sampling_includes_each_row_independently_with_rate_q(rate: float) -> None:
    rows, draws = 400, 3000
    data = TensorDataset(torch.arange(rows).float().unsqueeze(1), torch.zeros(rows))
    batches = PoissonBatches(data, sample_rate=rate, steps=draws, generator=torch.Generator().manual_seed(7))
    counts = torch.zeros(rows)
    sizes = []
    for xb, _ in batches:
        index = xb.squeeze(1).long()
        assert len(index.unique()) == len(index), "no row twice in one batch"
        counts[index] += 1
        sizes.append(len(index))
    # Each row: Binomial(draws, q) inclusions; batch size: Binomial(rows, q).
    inclusion = counts / draws
    assert abs(inclusion.mean().item() - rate) < 3 * math.sqrt(rate * (1 - rate) / (draws * rows))
    assert inclusion.std().item() == pytest.approx(math.sqrt(rate * (1 - rate) / draws), rel=0.15)
    size = torch.tensor(sizes, dtype=torch.float64)
    assert size.var().item() == pytest.approx(rows * rate * (1 - rate), rel=0.15)


def test_uniform_subset_is_uniform() -> None:
    from fedchurn.clients.dp_sgd import uniform_subset

    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(10)
    for _ in range(4000):
        subset = uniform_subset(10, 3, generator=generator)
        assert len(subset.unique()) == 3
        counts[subset] += 1
    assert torch.allclose(counts / 4000, torch.full((10,), 0.3), atol=0.03)
