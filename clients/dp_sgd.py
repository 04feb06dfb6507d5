"""DP-SGD for MLPs without per-sample gradient tensors: exact per-sample norms from two small products.

For a linear layer y = W a + b, one row's weight gradient is the outer product δ aᵀ (δ: the gradient at y), so
its squared norm is |δ|²·|a|² and the bias gradient's is |δ|². Summing over layers gives each row's exact
gradient norm; the clipped sum is then (c ⊙ δ)ᵀ a, one matrix product per layer. Nothing of size
batch × parameters is ever built, which is where Opacus' generic hooks spend their time on a small MLP.

The mechanism is Opacus' exactly: Poisson sampling with rate q for 1/q steps per epoch, flat clipping with factor
min(1, C / (|g_i| + 1e-6)), Gaussian noise N(0, σ²C²) on each summed gradient, division by the expected batch
size n·q. The accountant composes the same (σ, q, steps); tests compare gradients with Opacus' on equal batches.
Only models built from ``nn.Linear`` and parameter-free layers qualify (``supports``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset


def supports(model: nn.Module) -> bool:
    """True when every parameter sits in an ``nn.Linear`` and no layer keeps statistics across rows.

    Layers with buffers (BatchNorm's running statistics) mix rows of a batch, which per-row clipping cannot
    bound; layers without parameters or buffers (ReLU, Dropout, Sequential) are fine. Each Linear must be used
    once per forward pass.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            return False
    return True


class PoissonBatches:
    """Each of ``steps`` batches takes every row independently with probability ``sample_rate``.

    Drawn as Opacus draws them (a uniform number per row) when q is large. When q is small that costs O(n) per
    step for a batch of about n·q rows, so instead the batch size is drawn from Binomial(n, q) and then that many
    distinct rows uniformly: the same distribution (given its size, a Poisson sample is a uniform subset), at
    O(n·q) cost.
    """

    DENSE_ABOVE = 0.05  # sample rate above which one uniform draw per row is cheap enough

    def __init__(self, dataset: Dataset[Any], *, sample_rate: float, steps: int, generator: torch.Generator) -> None:
        self.dataset = dataset
        self.size = len(dataset)  # type: ignore[arg-type]
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        tensors = self.dataset.tensors  # type: ignore[attr-defined]
        for _ in range(self.steps):
            indices = self.draw()
            yield tuple(t[indices] for t in tensors)

    def draw(self) -> torch.Tensor:
        """Indices of one Poisson sample of the rows."""
        if self.sample_rate > self.DENSE_ABOVE:
            mask = torch.rand(self.size, generator=self.generator) < self.sample_rate
            return mask.nonzero(as_tuple=True)[0]
        count = int(
            torch.binomial(
                torch.tensor([float(self.size)]), torch.tensor([self.sample_rate]), generator=self.generator
            ).item()
        )
        return uniform_subset(self.size, count, generator=self.generator)


def uniform_subset(population: int, count: int, *, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct indices of ``range(population)``, every subset equally likely, in O(count) expected.

    The first ``count`` distinct values of an i.i.d. uniform stream form a uniformly random subset (the stream
    is exchangeable), so draw with replacement and keep values in order of first appearance.
    """
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    stream = torch.zeros(0, dtype=torch.long)
    while True:
        expected_repeats = count * count // (2 * population) + 16
        more = torch.randint(0, population, (count + expected_repeats,), generator=generator)
        stream = torch.cat([stream, more])
        values, inverse = torch.unique(stream, return_inverse=True)
        if len(values) >= count:
            break
    positions = torch.arange(len(stream))
    first = torch.full((len(values),), len(stream), dtype=torch.long).scatter_reduce(
        0, inverse, positions, reduce="amin"
    )
    return values[first.argsort()[:count]]


class VectorizedDPOptimizer:
    """Wraps an optimizer: ``step`` replaces each gradient by the clipped, noised, averaged DP gradient.

    Use like an optimizer with mean-reduced losses: ``zero_grad(); loss.backward(); step()``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        expected_batch_size: float,
        generator: torch.Generator | None,
    ) -> None:
        self.optimizer = optimizer
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.expected_batch_size = expected_batch_size
        self.generator = generator
        self.steps = 0  # steps taken: what the accountant composes
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear) and _trainable(m)]
        self._inputs: dict[nn.Linear, torch.Tensor] = {}
        self._grads: dict[nn.Linear, torch.Tensor] = {}
        self._handles = [layer.register_forward_hook(self._capture) for layer in self.layers]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def _capture(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        linear = layer  # only registered on nn.Linear
        self._inputs[linear] = inputs[0].detach()  # type: ignore[index]
        if output.requires_grad:

            def keep(grad: torch.Tensor) -> None:
                self._grads[linear] = grad.detach()  # type: ignore[index]

            output.register_hook(keep)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._inputs.clear()
        self._grads.clear()

    @torch.no_grad()
    def step(self) -> None:
        """Clip each row's gradient to C, sum, add N(0, σ²C²), divide by the expected batch size, step."""
        batch = self._batch_size()
        # The loss was a mean over the actual rows: undo it, to get each row's own gradient (as Opacus does).
        scale = float(batch)
        device = self.layers[0].weight.device if self.layers else torch.device("cpu")
        squared = torch.zeros(batch, device=device)
        deltas = {}
        for layer in self.layers:
            delta = self._grads.get(layer, torch.zeros(batch, layer.out_features, device=device)) * scale
            activation = self._inputs.get(layer, torch.zeros(batch, layer.in_features, device=device))
            deltas[layer] = (delta, activation)
            delta_sq = delta.pow(2).sum(dim=1)
            if layer.weight.requires_grad:
                squared += delta_sq * activation.pow(2).sum(dim=1)
            if layer.bias is not None and layer.bias.requires_grad:
                squared += delta_sq
        clip = (self.clipping_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        std = self.noise_multiplier * self.clipping_norm
        for layer, (delta, activation) in deltas.items():
            clipped = delta * clip.unsqueeze(1)
            if layer.weight.requires_grad:
                layer.weight.grad = (clipped.T @ activation + self._noise(layer.weight, std)) / self.expected_batch_size
            if layer.bias is not None and layer.bias.requires_grad:
                layer.bias.grad = (clipped.sum(dim=0) + self._noise(layer.bias, std)) / self.expected_batch_size
        self.optimizer.step()
        self.steps += 1

    def detach(self) -> None:
        """Remove the hooks: the model is a plain model again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _batch_size(self) -> int:
        for tensor in self._inputs.values():
            return int(tensor.shape[0])
        return 0

    def _noise(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        if std == 0.0:
            return torch.zeros_like(reference)
        return torch.normal(0.0, std, size=reference.shape, generator=self.generator, device=reference.device)


def _trainable(layer: nn.Linear) -> bool:
    return layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad)
