"""The accountant (shared/privacy_accounting) and DP-SGD training (clients/private_training): known ε values,
composition across rounds, and Opacus' DP-SGD mechanics."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedchurn.clients.private_training import PrivateTraining, make_private, unwrap
from fedchurn.shared.config import PrivacyConfig
from fedchurn.shared.errors import PrivacyError
from fedchurn.shared.privacy_accounting import (
    ACCOUNTANTS,
    AccountantState,
    MechanismStep,
    check_delta,
    compute_epsilon,
    epsilon_of,
    noise_multiplier_for,
    resolve_noise_multiplier,
    sample_rate_for,
)

# Opacus' per-sample hooks fire on module outputs when the inputs do not require gradients: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

# A few entries of ../shared/privacy_vectors.json, kept here so known values are checked even without the file.
INLINE_VECTORS: list[dict[str, Any]] = [
    {  # opacus/tests/accountants_test.py: the published RDP value 7.32911117143
        "name": "opacus_unit_test",
        "noise_multiplier": 1.5,
        "sample_rate": 0.04,
        "steps": 2250,
        "delta": 1e-05,
        "eps_opacus_rdp": 7.32911117143,
        "eps_opacus_prv": 6.779132,
        "eps_dpacc_pld": 6.768787,
    },
    {  # tensorflow/privacy compute_dp_sgd_privacy_test Test0
        "name": "tfp_unit_test0",
        "noise_multiplier": 1.3,
        "sample_rate": 0.0025,
        "steps": 6000,
        "delta": 1e-05,
        "eps_opacus_rdp": 0.7242234026109595,
        "eps_opacus_prv": 0.650058,
        "eps_dpacc_pld": 0.640111,
    },
    {  # q = 1: 100 Gaussian mechanisms = 2-GDP; PLD value is the exact analytic ε
        "name": "full_batch_gaussian_T100",
        "noise_multiplier": 5.0,
        "sample_rate": 1.0,
        "steps": 100,
        "delta": 1e-05,
        "eps_opacus_rdp": 10.72551,
        "eps_opacus_prv": 10.007715,
        "eps_dpacc_pld": 9.997256146434303,
    },
]

PRV_ABOVE_PLD_MAX = 0.05  # Opacus' PRV is an upper bound about 0.01 above the (tighter) PLD value
PRV_BELOW_PLD_TOL = 0.002  # PRV must never report less than the PLD value (beyond numerical noise)


def _check_vector(vector: dict[str, Any]) -> None:
    args = {k: vector[k] for k in ("noise_multiplier", "sample_rate", "steps", "delta")}
    rdp = compute_epsilon(**args, accountant="rdp")
    assert rdp == pytest.approx(vector["eps_opacus_rdp"], rel=1e-3), vector["name"]
    prv = compute_epsilon(**args, accountant="prv")
    pld = vector["eps_dpacc_pld"]
    assert pld - PRV_BELOW_PLD_TOL <= prv <= pld + PRV_ABOVE_PLD_MAX, (vector["name"], prv, pld)
    assert prv <= rdp  # PRV is the tighter of the two upper bounds


@pytest.mark.parametrize("vector", INLINE_VECTORS, ids=lambda v: v["name"])
def test_inline_known_values(vector: dict[str, Any]) -> None:
    _check_vector(vector)


def test_published_opacus_value_exactly() -> None:
    eps = compute_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, accountant="rdp")
    assert eps == pytest.approx(7.32911117143, rel=1e-9)


def test_privacy_vectors_file(privacy_vectors: list[dict[str, Any]]) -> None:
    for vector in privacy_vectors:
        _check_vector(vector)


# --------------------------------------------------------------------------------------------------
# compute_epsilon edge cases and validation
# --------------------------------------------------------------------------------------------------


def test_compute_epsilon_edges() -> None:
    for accountant in ACCOUNTANTS:
        assert compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5, accountant=accountant) == 0
        assert math.isinf(
            compute_epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=5, delta=1e-5, accountant=accountant)
        )
    more = compute_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=200, delta=1e-5)
    less = compute_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5)
    noisier = compute_epsilon(noise_multiplier=2.0, sample_rate=0.01, steps=100, delta=1e-5)
    assert noisier < less < more


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accountant": "gdp"}, "unknown accountant"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
    ],
)
def test_compute_epsilon_refuses_bad_input(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5}
    args.update(kwargs)
    with pytest.raises(PrivacyError, match=message):
        compute_epsilon(**args)


def test_prv_falls_back_to_rdp_when_its_grid_would_not_fit(caplog: pytest.LogCaptureFixture) -> None:
    # σ = 0.3 at q = 0.5 for 10,000 steps: PRV would allocate ~2e9 grid points and get the process killed
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="fedchurn.shared.privacy_accounting"):
        prv = compute_epsilon(noise_multiplier=0.3, sample_rate=0.5, steps=10_000, delta=1e-5, accountant="prv")
    assert time.perf_counter() - start < 5
    assert prv == compute_epsilon(noise_multiplier=0.3, sample_rate=0.5, steps=10_000, delta=1e-5, accountant="rdp")
    assert "RDP bound" in caplog.text


# --------------------------------------------------------------------------------------------------
# AccountantState
# --------------------------------------------------------------------------------------------------


def test_with_steps_merges_equal_mechanisms_and_appends_others() -> None:
    state = AccountantState(accountant="rdp")
    assert state.total_steps == 0 and epsilon_of(state, delta=1e-5) == 0.0
    state = state.with_steps(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    state = state.with_steps(noise_multiplier=1.0, sample_rate=0.01, steps=50)
    assert state.history == (MechanismStep(noise_multiplier=1.0, sample_rate=0.01, steps=150),)
    state = state.with_steps(noise_multiplier=1.2, sample_rate=0.01, steps=10)
    assert len(state.history) == 2 and state.total_steps == 160
    assert state.with_steps(noise_multiplier=1.2, sample_rate=0.01, steps=0) is state


def test_state_round_trips_through_json() -> None:
    state = (
        AccountantState(accountant="prv")
        .with_steps(noise_multiplier=1.1, sample_rate=1 / 47, steps=3)
        .with_steps(noise_multiplier=0.7, sample_rate=0.1 + 0.2, steps=12)
    )
    again = AccountantState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state
    assert AccountantState.from_dict({"accountant": "rdp", "history": []}) == AccountantState(accountant="rdp")
    assert AccountantState(accountant="rdp", history=[]).history == ()  # type: ignore[arg-type]


GOOD_ENTRY = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([GOOD_ENTRY], "mapping"),
        ({"accountant": "rdp"}, "exactly the keys"),
        ({"accountant": "rdp", "history": [], "extra": 1}, "exactly the keys"),
        ({"accountant": "gdp", "history": []}, "accountant = 'gdp'"),
        ({"accountant": None, "history": []}, "accountant = None"),
        ({"accountant": "rdp", "history": "[]"}, "history must be a list"),
        ({"accountant": "rdp", "history": [[1.0, 0.01, 10]]}, r"history\[0\]"),
        ({"accountant": "rdp", "history": [{**GOOD_ENTRY, "steps": -3}]}, r"history\[0\]\.steps = -3"),
        ({"accountant": "rdp", "history": [{**GOOD_ENTRY, "steps": 0}]}, "steps = 0"),
        ({"accountant": "rdp", "history": [{**GOOD_ENTRY, "steps": "10"}]}, "steps = '10'"),
        ({"accountant": "rdp", "history": [{**GOOD_ENTRY, "steps": 2.0}]}, "steps = 2.0"),
        ({"accountant": "rdp", "history": [{**GOOD_ENTRY, "steps": True}]}, "steps = True"),
        ({"accountant": "rdp", "history": [GOOD_ENTRY, {**GOOD_ENTRY, "sample_rate": 0.0}]}, r"history\[1\]"),
        ({"accountant": "rdp", "history": [{**GOOD_ENTRY, "sample_rate": 1.01}]}, "sample_rate = 1.01"),
        ({"accountant": "rdp", "history": [{**GOOD_ENTRY, "noise_multiplier": "1"}]}, "noise_multiplier = '1'"),
        ({"accountant": "rdp", "history": [{**GOOD_ENTRY, "noise_multiplier": -0.5}]}, "noise_multiplier"),
        ({"accountant": "rdp", "history": [{"noise_multiplier": 1.0, "steps": 10}]}, "exactly"),
    ],
)
def test_from_dict_refuses_malformed_state(data: Any, message: str) -> None:
    with pytest.raises(PrivacyError, match=message) as info:
        AccountantState.from_dict(data)
    assert "never reset" in str(info.value)  # the fix, not just the problem


# --------------------------------------------------------------------------------------------------
# Composition across rounds
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_rounds_compose_like_one_long_run(accountant: str) -> None:
    sigma, q, steps, rounds = 1.1, 0.02, 60, 7
    state = AccountantState(accountant=accountant)
    previous = 0.0
    for k in range(1, rounds + 1):
        state = state.with_steps(noise_multiplier=sigma, sample_rate=q, steps=steps)
        eps = epsilon_of(state, delta=1e-5)
        single = compute_epsilon(
            noise_multiplier=sigma, sample_rate=q, steps=k * steps, delta=1e-5, accountant=accountant
        )
        assert eps == pytest.approx(single, rel=1e-12)
        assert eps > previous  # cumulative: never the per-round value
        previous = eps


@pytest.mark.parametrize(
    ("accountant", "per_round", "after_50"),
    [("prv", 0.728134, 4.212083), ("rdp", 1.214145, 4.588969)],  # fl_1round_q0.01 / fl_50rounds_q0.01_n5000
)
def test_fifty_rounds_compose_sublinearly(accountant: str, per_round: float, after_50: float) -> None:
    # a bank of 5,000 rows, batch 50 (q = 0.01), one local epoch = 100 steps per round, σ = 1
    one_round = AccountantState(accountant=accountant).with_steps(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    state = one_round
    for _ in range(49):
        state = state.with_steps(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    eps_round = epsilon_of(one_round, delta=1e-5)
    eps_run = epsilon_of(state, delta=1e-5)
    assert eps_round == pytest.approx(per_round, rel=1e-3)
    assert eps_run == pytest.approx(after_50, rel=1e-3)
    if accountant == "prv":  # the figure the architecture note quotes: 0.72 per round -> about 4.2 for 50 rounds
        assert eps_round == pytest.approx(0.72, abs=0.01)
        assert eps_run == pytest.approx(4.2, abs=0.05)
    assert eps_run > 3 * eps_round  # not the per-round value a fresh PrivacyEngine per round would report
    assert eps_run < 50 * eps_round / 5  # and far below naive summation (35.9 for PRV)


def test_history_order_does_not_matter_and_equal_mechanisms_are_grouped() -> None:
    a = {"noise_multiplier": 1.0, "sample_rate": 0.01}
    b = {"noise_multiplier": 1.3, "sample_rate": 0.02}
    interleaved = AccountantState(
        accountant="prv",
        history=tuple(MechanismStep(**(a if i % 2 == 0 else b), steps=20) for i in range(50)),
    )
    grouped = AccountantState(accountant="prv", history=(MechanismStep(**a, steps=500), MechanismStep(**b, steps=500)))
    start = time.perf_counter()
    eps = epsilon_of(interleaved, delta=1e-5)
    assert time.perf_counter() - start < 5  # 50 separate PRV entries would take seconds each
    assert eps == pytest.approx(epsilon_of(grouped, delta=1e-5), rel=1e-12)
    reverse = AccountantState(accountant="prv", history=grouped.history[::-1])
    assert epsilon_of(reverse, delta=1e-5) == pytest.approx(eps, rel=1e-6)
    only_a = AccountantState(accountant="prv", history=grouped.history[:1])
    assert eps > epsilon_of(only_a, delta=1e-5)


# --------------------------------------------------------------------------------------------------
# Noise multiplier from a target ε, δ checks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accountant", "target", "q", "steps"),
    [("rdp", 3.0, 0.01, 5000), ("rdp", 8.0, 0.032, 1250), ("rdp", 0.5, 0.001, 2000), ("prv", 2.0, 0.05, 200)],
)
def test_noise_multiplier_for_meets_target_tightly(accountant: str, target: float, q: float, steps: int) -> None:
    sigma = noise_multiplier_for(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, accountant=accountant)
    eps = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant=accountant)
    assert target * 0.99 <= eps <= target


def test_resolve_noise_multiplier_budgets_the_whole_run() -> None:
    privacy = PrivacyConfig(noise_multiplier=None, target_epsilon=3.0, delta=1e-5, accountant="rdp")
    rounds, steps_per_round, q = 50, 100, 0.01
    sigma = resolve_noise_multiplier(privacy, sample_rate=q, total_steps=rounds * steps_per_round)
    state = AccountantState(accountant="rdp")
    for _ in range(rounds):
        state = state.with_steps(noise_multiplier=sigma, sample_rate=q, steps=steps_per_round)
    assert 3.0 * 0.99 <= epsilon_of(state, delta=1e-5) <= 3.0
    per_round_sigma = resolve_noise_multiplier(privacy, sample_rate=q, total_steps=steps_per_round)
    assert sigma > per_round_sigma  # a budget for 50 rounds needs more noise than one for a single round

    fixed = PrivacyConfig(noise_multiplier=1.7)
    assert resolve_noise_multiplier(fixed, sample_rate=q, total_steps=10) == 1.7
    with pytest.raises(PrivacyError, match="disabled"):
        resolve_noise_multiplier(PrivacyConfig(enabled=False), sample_rate=q, total_steps=10)


def test_unreachable_target_says_why() -> None:
    # RDP cannot certify ε ≈ 0.05 at δ = 1e-5 whatever σ is (its conversion floor is about 0.1)
    with pytest.raises(PrivacyError, match="accountant 'prv'"):
        noise_multiplier_for(target_epsilon=0.05, delta=1e-5, sample_rate=0.01, steps=1000, accountant="rdp")
    with pytest.raises(PrivacyError, match="target_epsilon"):
        noise_multiplier_for(target_epsilon=-1.0, delta=1e-5, sample_rate=0.01, steps=1000)
    with pytest.raises(PrivacyError, match="steps"):
        noise_multiplier_for(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=0)


def test_check_delta() -> None:
    check_delta(delta=1e-5, dataset_size=5000)
    check_delta(delta=1e-4, dataset_size=1001)
    for delta, n in ((1e-3, 1000), (1e-3, 2000), (0.5, 3)):
        with pytest.raises(PrivacyError, match="one customer's full row") as info:
            check_delta(delta=delta, dataset_size=n)
        assert f"{1 / (10 * n):.1e}" in str(info.value)
    with pytest.raises(PrivacyError, match="dataset_size"):
        check_delta(delta=1e-5, dataset_size=0)
    with pytest.raises(PrivacyError, match="delta"):
        check_delta(delta=0.0, dataset_size=10)


def test_sample_rate_for_matches_opacus() -> None:
    assert sample_rate_for(dataset_size=1000, batch_size=64) == 1 / 16  # ceil(1000/64) batches, not 64/1000
    assert sample_rate_for(dataset_size=640, batch_size=64) == 0.1
    assert sample_rate_for(dataset_size=10, batch_size=64) == 1.0
    module = nn.Linear(2, 1)
    training = make_private(
        module=module,
        optimizer=_sgd_for(module),
        data_loader=DataLoader(TensorDataset(torch.zeros(1000, 2), torch.zeros(1000)), batch_size=64),
        noise_multiplier=1.0,
        clipping_norm=1.0,
        state=AccountantState(accountant="rdp"),
    )
    assert training.sample_rate == sample_rate_for(dataset_size=1000, batch_size=64)
    assert training.optimizer.expected_batch_size == 62  # type: ignore[attr-defined]  # int(1000 / 16)
    assert len(training.data_loader) == 16


# --------------------------------------------------------------------------------------------------
# Private training through Opacus
# --------------------------------------------------------------------------------------------------


def _mlp(seed: int = 0, features: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, 1))


def _sgd_for(module: nn.Module, lr: float = 0.5) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=lr)


def _dataset(n: int = 64, features: int = 6, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).float()
    return TensorDataset(x, y)


def _train_epoch(training: PrivateTraining) -> int:
    loss_fn = nn.BCEWithLogitsLoss()  # mean over the batch, as Opacus' default loss_reduction expects
    steps = 0
    for x, y in training.data_loader:
        training.optimizer.zero_grad()
        loss_fn(training.module(x).squeeze(-1), y).backward()
        training.optimizer.step()
        steps += 1
    return steps


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_make_private_continues_restored_history(accountant: str) -> None:
    module = _mlp()
    loader = DataLoader(_dataset(64), batch_size=16)
    q = 1 / len(loader)
    restored_steps = 30
    state = AccountantState(accountant=accountant).with_steps(noise_multiplier=1.0, sample_rate=q, steps=restored_steps)
    training = make_private(
        module=module,
        optimizer=_sgd_for(module),
        data_loader=loader,
        noise_multiplier=1.0,
        clipping_norm=1.0,
        state=state,
        generator=torch.Generator().manual_seed(0),
    )
    assert training.sample_rate == q and training.noise_multiplier == 1.0
    new_steps = _train_epoch(training) + _train_epoch(training)
    after = training.finish()
    assert after.accountant == accountant
    assert after.total_steps == restored_steps + new_steps
    assert after.history == (MechanismStep(noise_multiplier=1.0, sample_rate=q, steps=restored_steps + new_steps),)
    total = compute_epsilon(
        noise_multiplier=1.0, sample_rate=q, steps=restored_steps + new_steps, delta=1e-5, accountant=accountant
    )
    assert epsilon_of(after, delta=1e-5) == pytest.approx(total, rel=1e-12)
    assert training.finish() is after  # idempotent

    keys = list(unwrap(training.module).state_dict())
    assert keys == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert unwrap(training.module) is module
    assert all(k.startswith("_module.") for k in training.module.state_dict())
    assert unwrap(module) is module


def test_same_module_object_can_train_privately_round_after_round() -> None:
    # A Ray actor may keep the module between rounds: finish() must detach Opacus' hooks so it can be wrapped again.
    module = _mlp()
    loader = DataLoader(_dataset(64), batch_size=16)
    state = AccountantState(accountant="rdp")
    epsilons = []
    for round_ in range(3):
        training = make_private(
            module=module,
            optimizer=_sgd_for(module),
            data_loader=loader,
            noise_multiplier=1.2,
            clipping_norm=1.0,
            state=state,
            generator=torch.Generator().manual_seed(round_),
        )
        _train_epoch(training)
        state = training.finish()
        epsilons.append(epsilon_of(state, delta=1e-5))
    assert state.total_steps == 3 * len(loader)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert not any(hasattr(p, "grad_sample") for p in module.parameters())
    fresh = make_private(  # the Flower-example mistake: a fresh history reports one round's ε only
        module=module,
        optimizer=_sgd_for(module),
        data_loader=loader,
        noise_multiplier=1.2,
        clipping_norm=1.0,
        state=AccountantState(accountant="rdp"),
    )
    _train_epoch(fresh)
    assert epsilon_of(fresh.finish(), delta=1e-5) == pytest.approx(epsilons[0])


def test_new_mechanism_is_appended_to_history() -> None:
    module = _mlp()
    loader = DataLoader(_dataset(64), batch_size=16)
    state = AccountantState(accountant="rdp").with_steps(noise_multiplier=2.0, sample_rate=0.5, steps=5)
    training = make_private(
        module=module,
        optimizer=_sgd_for(module),
        data_loader=loader,
        noise_multiplier=1.0,
        clipping_norm=1.0,
        state=state,
    )
    steps = _train_epoch(training)
    after = training.finish()
    assert after.history == (
        MechanismStep(noise_multiplier=2.0, sample_rate=0.5, steps=5),
        MechanismStep(noise_multiplier=1.0, sample_rate=0.25, steps=steps),
    )


def test_no_noise_and_no_clipping_equals_plain_sgd() -> None:
    dataset = _dataset(64)
    loader = DataLoader(dataset, batch_size=16)
    module = _mlp(seed=3)
    plain = copy.deepcopy(module)
    training = make_private(
        module=module,
        optimizer=_sgd_for(module),
        data_loader=loader,
        noise_multiplier=0.0,
        clipping_norm=1e6,
        state=AccountantState(accountant="rdp"),
    )
    assert training.optimizer.expected_batch_size == 16  # type: ignore[attr-defined]
    # One fixed batch of the expected size, driven through the DP optimizer (Poisson batches are random).
    x, y = dataset.tensors[0][:16], dataset.tensors[1][:16]
    loss_fn = nn.BCEWithLogitsLoss()
    training.optimizer.zero_grad()
    loss_fn(training.module(x).squeeze(-1), y).backward()
    training.optimizer.step()

    plain_optimizer = _sgd_for(plain)
    plain_optimizer.zero_grad()
    loss_fn(plain(x).squeeze(-1), y).backward()
    plain_optimizer.step()
    for private_p, plain_p in zip(unwrap(training.module).parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(private_p, plain_p, rtol=1e-5, atol=1e-6)
    assert math.isinf(epsilon_of(training.finish(), delta=1e-5))  # σ = 0 is recorded: no guarantee


def test_mean_reduction_divides_by_expected_not_actual_batch_size() -> None:
    # Opacus averages the clipped sum over the EXPECTED batch size (q·n): a Poisson batch of 8 rows moves the
    # weights half as far as plain SGD's mean over those 8 rows would when 16 rows are expected.
    dataset = _dataset(64)
    module = _mlp(seed=4)
    start = copy.deepcopy(module)
    plain = copy.deepcopy(module)
    training = make_private(
        module=module,
        optimizer=_sgd_for(module),
        data_loader=DataLoader(dataset, batch_size=16),
        noise_multiplier=0.0,
        clipping_norm=1e6,
        state=AccountantState(accountant="rdp"),
    )
    x, y = dataset.tensors[0][:8], dataset.tensors[1][:8]
    loss_fn = nn.BCEWithLogitsLoss()
    training.optimizer.zero_grad()
    loss_fn(training.module(x).squeeze(-1), y).backward()
    training.optimizer.step()
    plain_optimizer = _sgd_for(plain)
    plain_optimizer.zero_grad()
    loss_fn(plain(x).squeeze(-1), y).backward()
    plain_optimizer.step()
    for p0, p_dp, p_plain in zip(start.parameters(), module.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p_dp - p0, (p_plain - p0) * 8 / 16, rtol=1e-4, atol=1e-7)


def test_per_sample_gradients_are_clipped_to_the_norm() -> None:
    dataset = _dataset(64)
    module = _mlp(seed=5)
    reference = copy.deepcopy(module)
    start = [p.detach().clone() for p in module.parameters()]
    clip, lr, batch = 0.01, 1.0, 16
    training = make_private(
        module=module,
        optimizer=_sgd_for(module, lr=lr),
        data_loader=DataLoader(dataset, batch_size=batch),
        noise_multiplier=0.0,
        clipping_norm=clip,
        state=AccountantState(accountant="rdp"),
    )
    x, y = dataset.tensors[0][:batch], dataset.tensors[1][:batch]
    loss_fn = nn.BCEWithLogitsLoss()
    training.optimizer.zero_grad()
    loss_fn(training.module(x).squeeze(-1), y).backward()
    training.optimizer.step()

    # independent per-sample gradients, one row at a time through a plain copy
    expected = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(batch):
        reference.zero_grad()
        loss_fn(reference(x[i : i + 1]).squeeze(-1), y[i : i + 1]).backward()
        grads = [p.grad.detach().clone() for p in reference.parameters() if p.grad is not None]
        norm = torch.stack([(g**2).sum() for g in grads]).sum().sqrt()
        assert norm > clip  # every row is clipped, so each contributes a vector of norm exactly C
        factor = min(1.0, clip / (float(norm) + 1e-6))
        clipped_norm = torch.stack([((g * factor) ** 2).sum() for g in grads]).sum().sqrt()
        assert float(clipped_norm) <= clip * (1 + 1e-6)
        for acc, g in zip(expected, grads, strict=True):
            acc += g * factor
    update = [(p0 - p.detach()) / lr for p0, p in zip(start, module.parameters(), strict=True)]
    for u, e in zip(update, expected, strict=True):
        torch.testing.assert_close(u, e / batch, rtol=1e-4, atol=1e-7)  # float32 p0 - p
    total_update = torch.stack([(u**2).sum() for u in update]).sum().sqrt()
    assert float(total_update) <= clip + 1e-7  # mean of vectors of norm <= C


def test_noise_std_is_sigma_times_clip_over_expected_batch_size() -> None:
    features, outputs = 200, 50  # 10,050 parameters: the sample std is within ~1% of the truth
    sigma, clip, expected_batch = 2.0, 3.0, 32
    dataset = TensorDataset(torch.randn(160, features), torch.zeros(160))
    module = nn.Linear(features, outputs)
    start = [p.detach().clone() for p in module.parameters()]
    training = make_private(
        module=module,
        optimizer=_sgd_for(module, lr=1.0),
        data_loader=DataLoader(dataset, batch_size=expected_batch),
        noise_multiplier=sigma,
        clipping_norm=clip,
        state=AccountantState(accountant="rdp"),
        generator=torch.Generator().manual_seed(11),
    )
    x = dataset.tensors[0][:7]  # an actual batch of 7 rows: the noise is still scaled by the expected 32
    training.optimizer.zero_grad()
    (training.module(x) * 0.0).sum().backward()  # zero per-sample gradients: the update is pure noise
    training.optimizer.step()
    noise = torch.cat([(p0 - p.detach()).reshape(-1) for p0, p in zip(start, module.parameters(), strict=True)])
    measured = float(noise.std())
    assert measured == pytest.approx(sigma * clip / expected_batch, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * measured


def test_generator_makes_sampling_and_noise_reproducible() -> None:
    dataset = _dataset(64)

    def run(seed: int, global_seed: int) -> tuple[list[torch.Tensor], list[int]]:
        module = _mlp(seed=7)
        torch.manual_seed(global_seed)  # must not matter: the generator drives sampling and noise
        training = make_private(
            module=module,
            optimizer=_sgd_for(module),
            data_loader=DataLoader(dataset, batch_size=16),
            noise_multiplier=1.0,
            clipping_norm=1.0,
            state=AccountantState(accountant="rdp"),
            generator=torch.Generator().manual_seed(seed),
        )
        sizes = [len(x) for x, _ in training.data_loader]
        _train_epoch(training)
        training.finish()
        return [p.detach().clone() for p in module.parameters()], sizes

    first, sizes_first = run(seed=1, global_seed=100)
    second, sizes_second = run(seed=1, global_seed=200)
    other, _ = run(seed=2, global_seed=100)
    assert sizes_first == sizes_second
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(first, other, strict=True))


def test_make_private_refuses_bad_input() -> None:
    loader = DataLoader(_dataset(64), batch_size=16)
    module = _mlp()
    state = AccountantState(accountant="rdp")
    base: dict[str, Any] = {"module": module, "optimizer": _sgd_for(module), "data_loader": loader, "state": state}
    with pytest.raises(PrivacyError, match="clipping_norm"):
        make_private(**base, noise_multiplier=1.0, clipping_norm=0.0)
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        make_private(**base, noise_multiplier=-1.0, clipping_norm=1.0)
    with pytest.raises(PrivacyError, match="AccountantState"):
        make_private(**{**base, "state": state.to_dict()}, noise_multiplier=1.0, clipping_norm=1.0)
    with pytest.raises(PrivacyError, match="BatchNorm"):
        bn = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        make_private(**{**base, "module": bn, "optimizer": _sgd_for(bn)}, noise_multiplier=1.0, clipping_norm=1.0)


@pytest.mark.gpu
def test_cuda_module_with_cpu_generator_is_reproducible() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")

    def run() -> list[torch.Tensor]:
        module = _mlp(seed=8).cuda()
        training = make_private(
            module=module,
            optimizer=_sgd_for(module),
            data_loader=DataLoader(_dataset(64), batch_size=16),
            noise_multiplier=1.0,
            clipping_norm=1.0,
            state=AccountantState(accountant="rdp"),
            generator=torch.Generator().manual_seed(3),
        )
        loss_fn = nn.BCEWithLogitsLoss()
        for x, y in training.data_loader:
            training.optimizer.zero_grad()
            loss_fn(training.module(x.cuda()).squeeze(-1), y.cuda()).backward()
            training.optimizer.step()
        training.finish()
        return [p.detach().cpu() for p in module.parameters()]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)
