"""How a parameter is cut into Shampoo blocks.

A parameter is squeezed, its adjacent small dimensions merged (while their
product stays within ``max_preconditioner_dim``) and every merged dimension
split into pieces of at most that size. Each block is an independent Shampoo
problem whose Kronecker factors are at most ``max_dim x max_dim``: that bound
is what keeps the root computations affordable.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import List, Sequence, Tuple

import torch


def merged_shape(shape: Sequence[int], max_dim: int) -> Tuple[int, ...]:
    """``shape`` without its size-1 dimensions, adjacent dimensions merged
    left to right while the product stays ``<= max_dim``."""
    merged: List[int] = []
    for n in shape:
        if n == 1:
            continue
        if merged and merged[-1] * n <= max_dim:
            merged[-1] *= n
        else:
            merged.append(n)
    return tuple(merged)


def _pieces(n: int, max_dim: int) -> List[slice]:
    return [slice(start, min(start + max_dim, n)) for start in range(0, n, max_dim)]


@dataclass(frozen=True)
class Block:
    """One block of one parameter: where it sits and how big it is."""

    param_index: int
    index: int  # within its parameter, lexicographic over the pieces
    merged_shape: Tuple[int, ...]
    slices: Tuple[slice, ...]

    # Cached: the step asks for them on every block, every step.
    @cached_property
    def shape(self) -> Tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.slices)

    @property
    def order(self) -> int:
        return len(self.slices)

    @cached_property
    def numel(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The block's part of a parameter-shaped tensor (a view when the
        tensor is contiguous)."""
        return tensor.reshape(self.merged_shape)[self.slices]

    @property
    def cost(self) -> int:
        """Work per step and per root computation, for balancing blocks over
        ranks: the roots (cubic in each side) and the preconditioning."""
        return sum(n**3 for n in self.shape) + self.numel * sum(self.shape)


def param_blocks(param_index: int, shape: Sequence[int], max_dim: int) -> List[Block]:
    """The blocks of one parameter, in lexicographic order of their pieces."""
    merged = merged_shape(shape, max_dim)
    pieces = [_pieces(n, max_dim) for n in merged]
    return [
        Block(param_index, index, merged, tuple(choice))
        for index, choice in enumerate(itertools.product(*pieces))
    ]
