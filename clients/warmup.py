"""Warm-up before round 1: a worker does once what every first message would otherwise pay for.

A simulated federation's round 1 used to take 3-4x a later round: each worker process imports torch's lazily
loaded optimiser machinery on its first optimiser, and each institution's first message prepares its rows (split
with the bank's secret key, preprocessing). The server's warm-up query (server/warmup.py) lets every institution
do both before the clock of round 1 starts. Nothing here leaves the bank: the reply is an empty acknowledgement,
whatever happens.
"""

from __future__ import annotations

import functools
import logging

import torch

from fedchurn.clients.institution import load_data
from fedchurn.clients.institution_identity import Institution

logger = logging.getLogger(__name__)


@functools.cache
def warm_torch() -> None:
    """Import, once per process, what torch loads lazily on the first optimiser (torch._dynamo: ~0.8 s)."""
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=0.0)
    weight.sum().backward()
    optimizer.step()


def warm_up(institution: Institution) -> None:
    """Prepare this institution's rows in this worker's cache and warm torch; raises what preparing raises."""
    warm_torch()
    load_data(institution)  # the bank's own split, with its own secret key; cached for its first round
