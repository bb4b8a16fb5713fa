"""What one synchronisation round computes from the replicas' parameters
(ShadowSync, Zheng et al.: S-MA, S-EASGD, S-BMUF).

A rule turns this replica's parameters ``x`` (one flat float tensor, the
replica's copy taken at the start of the round) into its target after the
round, given ``all_reduce_sum`` (the sum over the replicas, a collective).
The same rule runs in the foreground (``x`` replaced by the target every k
steps) and in the background (``shadow.py``: the target minus the copy is
added to the live parameters, so that the updates the trainer made during
the round are kept). Rules keep state across rounds (EASGD's centre,
BMUF's previous global model and smoothed step); it is the same on every
replica, since every replica computes it from the same sums.

* ``ModelAveraging`` (MA): the mean of the replicas.
* ``ElasticAveraging`` (EASGD, Zhang et al. 2015): every replica moves
  ``alpha`` of its distance toward a centre variable, and the centre moves
  ``alpha`` times the replicas' summed distance toward them. ShadowSync keeps
  the centre on parameter servers; here each replica keeps a copy, updated
  from the same all-reduced sum.
* ``BlockMomentum`` (BMUF, Chen & Huo 2016) with fairseq's semantics:
  ``g = previous - mean(x)``, ``smoothed = mu * smoothed + eta * g``,
  ``global = previous - smoothed`` (Nesterov: minus ``mu * smoothed`` once
  more), ``previous = global``. With ``mu = 0`` and ``eta = 1`` it is MA.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

AllReduceSum = Callable[[torch.Tensor], torch.Tensor]  # returns the sum over the replicas (a new tensor)

RULES = ("ma", "easgd", "bmuf")


class ModelAveraging:
    name = "ma"

    def __init__(self, replicas: int) -> None:
        self.replicas = int(replicas)

    def target(self, x: torch.Tensor, all_reduce_sum: AllReduceSum) -> torch.Tensor:
        return all_reduce_sum(x) / self.replicas


class ElasticAveraging:
    """EASGD's elastic round. ``alpha`` in (0, 1/replicas] keeps the centre
    update a contraction (Zhang et al.'s condition). The centre starts at
    the replicas' mean (the first round's sum)."""

    name = "easgd"

    def __init__(self, replicas: int, alpha: float) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Invalid sync.alpha={alpha}. Must be in (0, 1].")
        self.replicas, self.alpha = int(replicas), float(alpha)
        self.center: Optional[torch.Tensor] = None

    def target(self, x: torch.Tensor, all_reduce_sum: AllReduceSum) -> torch.Tensor:
        if self.center is None:
            self.center = all_reduce_sum(x) / self.replicas
        distance = x - self.center
        total = all_reduce_sum(distance)
        self.center = self.center + self.alpha * total
        return x - self.alpha * distance


class BlockMomentum:
    """BMUF. ``previous`` is the global model of the last round: the
    replicas' common starting point at the first round (``start``), else
    their mean at the first round."""

    name = "bmuf"

    def __init__(self, replicas: int, block_momentum: float = 0.875, block_lr: float = 1.0, nesterov: bool = False,
                 start: Optional[torch.Tensor] = None) -> None:  # fmt: skip
        if not 0.0 <= block_momentum < 1.0 or block_lr <= 0:
            raise ValueError(f"Invalid sync.block_momentum={block_momentum} / sync.block_lr={block_lr}. "
                             "Must be in [0, 1) and > 0.")  # fmt: skip
        self.replicas = int(replicas)
        self.block_momentum, self.block_lr, self.nesterov = float(block_momentum), float(block_lr), bool(nesterov)
        self.previous = None if start is None else start.detach().clone()
        self.smoothed: Optional[torch.Tensor] = None

    def target(self, x: torch.Tensor, all_reduce_sum: AllReduceSum) -> torch.Tensor:
        mean = all_reduce_sum(x) / self.replicas
        if self.previous is None:
            self.previous = mean
        step = self.previous - mean
        self.smoothed = self.block_lr * step if self.smoothed is None else self.block_momentum * self.smoothed + self.block_lr * step
        result = self.previous - self.smoothed
        if self.nesterov:
            result = result - self.block_momentum * self.smoothed
        self.previous = result
        return result.clone()


def make_rule(name: str, replicas: int, alpha: float = 0.5, block_momentum: float = 0.875, block_lr: float = 1.0,
              nesterov: bool = False, start: Optional[torch.Tensor] = None):  # fmt: skip
    if name == "ma":
        return ModelAveraging(replicas)
    if name == "easgd":
        return ElasticAveraging(replicas, alpha)
    if name == "bmuf":
        return BlockMomentum(replicas, block_momentum, block_lr, nesterov, start)
    raise ValueError(f"Invalid sync.dense={name!r}. Must be 'ddp' or one of {RULES}.")
