"""``InMemoryStorage``: every row in one tensor per table, in the rank's own memory.

This is the storage every table had before there were others: the kernels
get the tables' raw pointers (no copy, no staging), the state is one
float32 tensor per optimizer state per table, and blocks are handed out as
live views. On the CPU the tensors sit on 2 MiB huge pages
(``dist_rec.ops.empty_hugepage``): random row gathers miss the TLB less.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from dist_rec.ops.embedding_bag import _ops, empty_hugepage
from dist_rec.placement.location import EmbeddingLocation
from dist_rec.placement.storage import Block, EmbeddingStorage, Layout, TableSpec


class InMemoryStorage(EmbeddingStorage):
    """Tables as whole tensors on ``device`` (CPU: huge pages).

    Args:
        tables, state_names, device: as ``EmbeddingStorage``.
        weights (Optional[Sequence[Tensor]]): existing ``[rows, dim]`` tensors
            to hold (an ``EmbeddingBagCollection`` hands over its
            ``nn.EmbeddingBag`` weights); new uninitialised ones when None.
    """

    location = EmbeddingLocation.DEVICE

    def __init__(
        self,
        tables: Sequence[TableSpec],
        state_names: Sequence[str],
        device: torch.device,
        weights: Optional[Sequence[torch.Tensor]] = None,
    ) -> None:
        super().__init__(tables, state_names, device)
        if weights is None:
            weights = [self._empty((s.num_rows, s.dim), s.dtype) for s in self.tables]
        weights = list(weights)
        for spec, weight in zip(self.tables, weights):
            if tuple(weight.shape) != (spec.num_rows, spec.dim) or weight.dtype != spec.dtype:
                raise ValueError(
                    f"InMemoryStorage: table {spec.name!r} is {spec.num_rows} x {spec.dim} {spec.dtype}; "
                    f"its tensor is {tuple(weight.shape)} {weight.dtype}."
                )
        self._weights: List[torch.Tensor] = weights
        self._states: List[Dict[str, torch.Tensor]] = [
            {name: self._empty((s.num_rows,), torch.float32).zero_() for name in self.state_names} for s in self.tables
        ]

    def _empty(self, size, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":
            return empty_hugepage(size, dtype)
        return torch.empty(size, dtype=dtype, device=self.device)

    # -- the live tensors (for the module that owns the tables) ----------------

    def weight(self, table: int) -> torch.Tensor:
        """Table ``table``'s weight tensor itself."""
        return self._weights[table]

    def state(self, table: int) -> Dict[str, torch.Tensor]:
        """Table ``table``'s state tensors themselves, by name."""
        return self._states[table]

    def rebind_weights(self, weights: Sequence[torch.Tensor]) -> None:
        """Holds ``weights`` instead (the owner moved or cast its tables)."""
        weights = list(weights)
        for t, (spec, weight) in enumerate(zip(self.tables, weights)):
            if tuple(weight.shape) != (spec.num_rows, spec.dim):
                raise ValueError(f"InMemoryStorage: table {spec.name!r} is {spec.num_rows} x {spec.dim}; got {tuple(weight.shape)}.")
            self.tables[t] = TableSpec(spec.name, spec.num_rows, spec.dim, weight.dtype)
        self._weights = weights

    def reset_state_(self) -> None:
        for state in self._states:
            for tensor in state.values():
                tensor.zero_()

    # -- lookups and the fused update: the kernels on the tables themselves ------

    def forward(self, layout: Layout, indices_N, offsets, per_sample_weights_N) -> torch.Tensor:
        # Past the op's autograd layer: its Python wrapper costs tens of
        # microseconds a call, and the fused lookup has its own backward.
        with torch._C._AutoDispatchBelowAutograd():
            return _ops.embedding_bag_forward.default(self._weights, *layout, indices_N, offsets, per_sample_weights_N)

    def fused_update(self, optimizer, layout: Layout, indices_N, offsets, per_sample_weights_N, grad_output_BD) -> None:
        optimizer.backward_(self._weights, self._states, layout, indices_N, offsets, per_sample_weights_N, grad_output_BD)

    def fused_update_refuses_non_finite(self, optimizer, grad_output_BD: torch.Tensor) -> bool:
        # The gradient goes straight to the optimizer's kernel.
        return grad_output_BD.device.type == "cpu" and optimizer.refuses_non_finite_gradient()

    def row_grads(self, layout: Layout, indices_N, offsets, per_sample_weights_N, grad_output_BD):
        return _ops.embedding_bag_backward_row_grad(
            self._weights, *layout, indices_N, offsets, per_sample_weights_N, grad_output_BD.contiguous()
        )

    def per_sample_weights_grad(self, layout: Layout, indices_N, offsets, grad_output_BD) -> torch.Tensor:
        return _ops.embedding_bag_per_sample_weights_grad(self._weights, *layout, indices_N, offsets, grad_output_BD)

    # -- rows and blocks ---------------------------------------------------------

    def read_rows(self, table: int, ids_U: torch.Tensor) -> Block:
        return self._weights[table][ids_U], {name: t[ids_U] for name, t in self._states[table].items()}

    def write_rows(self, table: int, ids_U, weight_UD=None, state=None) -> None:
        if weight_UD is not None:
            self._weights[table][ids_U] = weight_UD.to(self._weights[table].dtype)
        for name, values in (state or {}).items():
            self._states[table][name][ids_U] = values

    def read_block(self, table: int, start: int = 0, count: Optional[int] = None) -> Block:
        count = self.tables[table].num_rows - start if count is None else count
        self._check_block(table, start, count)
        end = start + count
        return self._weights[table][start:end], {name: t[start:end] for name, t in self._states[table].items()}

    def write_block(self, table: int, start: int, weight=None, state=None) -> None:
        if weight is not None:
            self._check_block(table, start, weight.shape[0])
            _copy_unless_same(self._weights[table][start : start + weight.shape[0]], weight)
        for name, values in (state or {}).items():
            self._check_block(table, start, values.shape[0])
            _copy_unless_same(self._states[table][name][start : start + values.shape[0]], values)

    def reset_(self, init_ranges) -> None:
        with torch.no_grad():
            for weight, (low, high) in zip(self._weights, init_ranges):
                weight.uniform_(low, high)
        self.reset_state_()


def _copy_unless_same(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``, skipped when ``source`` is that very view."""
    if (
        source.data_ptr() == target.data_ptr()
        and source.shape == target.shape
        and source.stride() == target.stride()
        and source.dtype == target.dtype
    ):
        return
    with torch.no_grad():
        target.copy_(source)
