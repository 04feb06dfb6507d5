"""DP-SGD training through Opacus (or the vectorised implementation of the same mechanism), continuing the
composition history an institution keeps (shared/privacy_accounting.py).

Every round, :func:`make_private` builds a fresh Opacus ``PrivacyEngine`` whose accountant is *restored* from the
institution's history before training, and :meth:`PrivateTraining.finish` hands back the history extended by this
round's steps. The data loader it returns samples Poisson batches, which is what the accounting assumes.

This is the only module of the project that imports Opacus' training engine.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader

from fedchurn.clients import dp_sgd
from fedchurn.shared.errors import PrivacyError
from fedchurn.shared.privacy_accounting import AccountantState, MechanismStep

logger = logging.getLogger(__name__)

__all__ = ["IMPLEMENTATIONS", "PrivateTraining", "make_private", "unwrap"]

IMPLEMENTATIONS = ("opacus", "vectorized")  # two implementations of one DP-SGD mechanism


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------
# Private training
# --------------------------------------------------------------------------------------------------


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns: train with these three, then call :meth:`finish`."""

    module: nn.Module  # GradSampleModule around the original module
    optimizer: torch.optim.Optimizer  # DPOptimizer: clips per-sample gradients, adds noise
    data_loader: DataLoader[Any]  # DPDataLoader: Poisson sampling, variable (possibly empty) batches
    sample_rate: float  # q used by the accountant: 1 / len(original data loader)
    noise_multiplier: float
    _engine: Any = field(repr=False, compare=False)
    _finished: AccountantState | None = field(default=None, repr=False, compare=False)

    def finish(self) -> AccountantState:
        """End private training: the accountant's whole history (restored + new steps), hooks detached.

        Detaching Opacus' hooks leaves ``unwrap(self.module)`` a plain module again, so the same module object
        can be evaluated cheaply or made private again next round. Calling ``finish`` twice returns the same
        state; training steps after ``finish`` are not possible.
        """
        if self._finished is not None:
            return self._finished
        if isinstance(self._engine, _VectorizedRun):
            self._finished = self._engine.finish()
            return self._finished
        accountant = self._engine.accountant
        history = tuple(
            MechanismStep(noise_multiplier=float(sigma), sample_rate=float(q), steps=int(steps))
            for sigma, q, steps in accountant.history
        )
        state = AccountantState(accountant=accountant.mechanism(), history=history)
        if isinstance(self.module, AbstractGradSampleModule):
            self.module.to_standard_module()  # removes hooks and per-sample gradient attributes
        self._finished = state
        return state


def make_private(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    noise_multiplier: float,
    clipping_norm: float,
    state: AccountantState,
    generator: torch.Generator | None = None,
    implementation: str = "opacus",
) -> PrivateTraining:
    """Wrap module, optimizer and data loader for DP-SGD, continuing the composition history in ``state``.

    Flat clipping to ``clipping_norm``, Gaussian noise σ·C on the summed clipped gradients, divided by the
    *expected* batch size (Opacus' mean reduction), Poisson sampling with q = 1 / len(data_loader).
    The training loss must be the batch mean (e.g. ``BCEWithLogitsLoss()``). Poisson batches vary in size and
    can be empty (the loss is then NaN, but no gradient flows): keep stepping, every step is accounted for.

    Randomness: ``generator`` (a CPU ``torch.Generator``) drives both the Poisson sampling and the noise. Opacus'
    ``make_private`` takes a generator for the noise only and samples with the original loader's generator, so the
    DP loader is rebuilt here with ``generator``. When the parameters live on another device, the noise
    generator is a generator on that device seeded from ``generator``. Without ``generator``, sampling uses
    ``data_loader.generator`` if set and otherwise, like the noise, torch's global RNG (``torch.manual_seed``).
    ``secure_mode`` is off: pseudo-random noise is fine for research, not for a production guarantee.

    ``implementation="vectorized"`` runs the same mechanism without Opacus' per-sample hooks (``clients/dp_sgd.py``:
    exact per-row norms for MLPs); a model it cannot handle falls back to Opacus, with a log line.
    """
    if implementation not in IMPLEMENTATIONS:
        raise PrivacyError(f"privacy.implementation = {implementation!r}: must be one of {', '.join(IMPLEMENTATIONS)}")
    if not _is_number(noise_multiplier) or not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise PrivacyError(f"noise_multiplier = {noise_multiplier!r}: must be a finite number >= 0")
    if not _is_number(clipping_norm) or not math.isfinite(clipping_norm) or clipping_norm <= 0:
        raise PrivacyError(f"clipping_norm = {clipping_norm!r}: must be a finite number > 0")
    if not isinstance(state, AccountantState):
        raise PrivacyError(
            f"state must be an AccountantState, got {type(state).__name__} (use AccountantState.from_dict)"
        )
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator is on {generator.device}: Poisson sampling draws on the CPU, pass a CPU torch.Generator"
        )
    if isinstance(module, AbstractGradSampleModule):
        raise ValueError("module is already wrapped by Opacus: pass the plain module (see unwrap)")
    if len(data_loader) == 0:
        raise PrivacyError("the data loader yields no batches: the institution has no training rows")

    if implementation == "vectorized":
        if dp_sgd.supports(module):
            return _make_private_vectorized(
                module=module,
                optimizer=optimizer,
                data_loader=data_loader,
                noise_multiplier=float(noise_multiplier),
                clipping_norm=float(clipping_norm),
                state=state,
                generator=generator,
            )
        logger.info("the model has layers the vectorized engine does not handle: using Opacus' hooks")

    noise_generator = _noise_generator(module, generator) if generator is not None else None

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # a deliberate choice, see docstring
        engine = PrivacyEngine(accountant=state.accountant, secure_mode=False)
    if state.history:
        engine.accountant.load_state_dict(
            {
                "history": [(s.noise_multiplier, s.sample_rate, s.steps) for s in state.history],
                "mechanism": state.accountant,
            }
        )
    try:
        private_module, private_optimizer, private_loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(clipping_norm),
            poisson_sampling=True,
            clipping="flat",
            noise_generator=noise_generator,
        )
    except UnsupportedModuleError as exc:
        raise PrivacyError(
            f"the model has layers Opacus cannot train with per-sample gradients: {exc} "
            "(BatchNorm mixes rows of a batch: use no normalisation or GroupNorm/LayerNorm)"
        ) from None
    if generator is not None:
        # Same dataset and q as the loader Opacus built; only the sampling generator differs.
        private_loader = DPDataLoader.from_data_loader(data_loader, generator=generator)
    sample_rate = float(private_loader.sample_rate)
    logger.debug(
        "private training: σ = %g, C = %g, q = %.4g, expected batch %d, restored %d steps (%s)",
        noise_multiplier,
        clipping_norm,
        sample_rate,
        private_optimizer.expected_batch_size,
        state.total_steps,
        state.accountant,
    )
    return PrivateTraining(
        module=private_module,
        optimizer=private_optimizer,
        data_loader=private_loader,
        sample_rate=sample_rate,
        noise_multiplier=float(noise_multiplier),
        _engine=engine,
    )


@dataclass
class _VectorizedRun:
    optimizer: dp_sgd.VectorizedDPOptimizer
    state: AccountantState
    noise_multiplier: float
    sample_rate: float

    def finish(self) -> AccountantState:
        self.optimizer.detach()
        return self.state.with_steps(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.optimizer.steps
        )


def _noise_generator(module: nn.Module, generator: torch.Generator) -> torch.Generator:
    """``generator`` itself on the CPU; on a GPU, a generator there seeded from it (noise is drawn where the
    gradients live)."""
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.Generator(device=parameter.device).manual_seed(seed)


def _make_private_vectorized(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    noise_multiplier: float,
    clipping_norm: float,
    state: AccountantState,
    generator: torch.Generator | None,
) -> PrivateTraining:
    # Opacus' own conventions, so both engines are one mechanism: q = 1 / len(loader), 1/q steps per epoch,
    # expected batch size int(n q).
    steps = len(data_loader)
    sample_rate = 1.0 / steps
    size = len(data_loader.dataset)  # type: ignore[arg-type]
    rng = generator if generator is not None else torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    noise_rng = _noise_generator(module, rng)
    private_optimizer = dp_sgd.VectorizedDPOptimizer(
        module,
        optimizer,
        noise_multiplier=noise_multiplier,
        clipping_norm=clipping_norm,
        expected_batch_size=max(1, int(size * sample_rate)),
        generator=noise_rng,
    )
    loader = dp_sgd.PoissonBatches(data_loader.dataset, sample_rate=sample_rate, steps=steps, generator=rng)
    return PrivateTraining(
        module=module,
        optimizer=private_optimizer,  # type: ignore[arg-type]
        data_loader=loader,  # type: ignore[arg-type]
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        _engine=_VectorizedRun(
            optimizer=private_optimizer, state=state, noise_multiplier=noise_multiplier, sample_rate=sample_rate
        ),
    )


def unwrap(module: nn.Module) -> nn.Module:
    """The original module inside Opacus' wrapper(s); its state-dict keys carry no ``_module.`` prefix."""
    while isinstance(module, AbstractGradSampleModule):
        inner = module._module
        if not isinstance(inner, nn.Module):  # pragma: no cover - Opacus always wraps an nn.Module
            raise TypeError(f"unexpected Opacus wrapper content: {type(inner).__name__}")
        module = inner
    return module
