"""The local lookups of a sharded collection: storage plus update rule.

A rank's shards are looked up in a few groups, each one fused lookup of
one storage (``dist_rec.placement``): the regular shards of each storage
location, the column blocks that agree their row state, the data-parallel
tables. ``LocalLookup`` pools a group's slots for the batch the input dist
delivered, and in the backward hands the output gradient to the group's
``UpdateRule``. The rules are small objects given at construction (no
callable is patched onto a module): ``FusedUpdate`` here,
``ColumnBlockUpdate`` in ``cw.py``, ``DataParallelUpdate`` in ``dp.py``.

Shape legend: S slots, B batch (the group's), N ids, W pooled width.
"""

from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Sequence

import torch

from dist_rec.ops.embedding_bag import PoolingMode
from dist_rec.ops.fused_lookup import fused_lookup
from dist_rec.modules.embedding_configs import PoolingType
from dist_rec.modules.embedding_modules import refusing_non_finite_gradient
from dist_rec.placement import EmbeddingStorage

_POOLING_MODE = {PoolingType.SUM: int(PoolingMode.SUM), PoolingType.MEAN: int(PoolingMode.MEAN)}


class UpdateRule:
    """How a local lookup's rows are stepped from the gradient of its pooled output."""

    def __call__(self, storage: EmbeddingStorage, optimizer, layout, indices_N, offsets, weights_N, grad_output) -> None:
        raise NotImplementedError


class FusedUpdate(UpdateRule):
    """The fused kernel on the storage: each touched row stepped once with
    its gradient summed over the batch."""

    def __call__(self, storage, optimizer, layout, indices_N, offsets, weights_N, grad_output) -> None:
        storage.fused_update(optimizer, layout, indices_N, offsets, weights_N, grad_output)


class LocalLookup:
    """One fused lookup of local tables, in a fixed slot order.

    Args:
        storage (EmbeddingStorage): the tables' rows and state.
        slot_tables (Sequence[int]): per slot (a feature's bags at one
            shard), the storage table it reads.
        slot_pooling (Sequence[PoolingType]): per slot, how it pools.
        optimizer: the fused optimizer its ``update`` steps with.
        update (UpdateRule): what the backward does with the output gradient.
        is_weighted (bool): bags carry per-id weights.
    """

    def __init__(
        self,
        storage: EmbeddingStorage,
        slot_tables: Sequence[int],
        slot_pooling: Sequence[PoolingType],
        optimizer,
        update: UpdateRule,
        is_weighted: bool,
    ) -> None:
        self.storage = storage
        self.optimizer = optimizer
        self.update = update
        self.is_weighted = is_weighted
        dims = [storage.tables[t].dim for t in slot_tables]
        columns = [sum(dims[:i]) for i in range(len(dims))]
        self.layout = (list(slot_tables), [_POOLING_MODE[p] for p in slot_pooling], columns)
        self.num_slots = len(slot_tables)
        self.width = sum(dims)
        self.tracker = None  # a checkpoint policy's RowTracker: rows touched (and counts) since the last save
        self.update_lock = None  # background replica sync: held while the rows are stepped (``dist_rec.sync``)
        self.sync_tracker = None  # background replica sync's RowTracker: rows touched since its last round
        # Puts the lookup in the autograd graph though the tables do not require grad.
        self._grad_anchor = torch.empty(0, device=storage.device, requires_grad=True)

    def __call__(self, lengths_SB: torch.Tensor, values_N: torch.Tensor, weights_N: Optional[torch.Tensor]) -> torch.Tensor:
        """Pooled ``[B, W]`` of the slots' bags (``lengths_SB`` slot-major)."""
        offsets = lengths_SB.new_zeros(lengths_SB.numel() + 1, dtype=values_N.dtype)
        torch.cumsum(lengths_SB.reshape(-1), 0, out=offsets[1:])
        weights_N = weights_N if self.is_weighted else None
        self.storage.prefetch(self.layout, values_N, offsets)
        apply_grad = functools.partial(self._update, values_N, offsets, weights_N)
        return fused_lookup(self._grad_anchor, self.storage, self.layout, values_N, offsets, weights_N, apply_grad)

    def _update(self, values_N, offsets, weights_N, grad_output: torch.Tensor) -> None:
        checked_in_update = type(self.update) is FusedUpdate and self.storage.fused_update_refuses_non_finite(
            self.optimizer, grad_output
        )
        lock = self.update_lock if self.update_lock is not None else contextlib.nullcontext()
        with refusing_non_finite_gradient(grad_output, self.tables(), checked_in_update), lock:
            self.update(self.storage, self.optimizer, self.layout, values_N, offsets, weights_N, grad_output)
            if self.sync_tracker is not None:  # with the update, under the lock a round swaps the marks under
                self.sync_tracker.record(self.layout, values_N, offsets)
        if self.tracker is not None:
            self.tracker.record(self.layout, values_N, offsets)

    def tables(self) -> List[str]:
        return [spec.name for spec in self.storage.tables]
