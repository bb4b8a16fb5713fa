"""``StagedStorage``: lookups and fused updates of rows that are not one
addressable tensor, staged through compact copies of the rows a batch touches.

A storage whose rows live in a file or across tiers implements only
``read_rows`` / ``write_rows`` (and blocks); this base class does the rest.
For each batch it gathers the unique rows it touches into small in-memory
tables, re-addresses the batch to them (``staged_ids``), runs the very
kernels ``InMemoryStorage`` runs on those, and for the fused update writes
the stepped rows and state back. Row-wise optimizers touch each row on its
own, so the result is the in-memory one bit for bit (tests check it).
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from dist_rec.ops.embedding_bag import _ops
from dist_rec.placement.storage import EmbeddingStorage, Layout, staged_ids


class StagedStorage(EmbeddingStorage):
    """Kernels on per-batch compact copies; subclasses store the rows."""

    def _staged_ids(self, layout: Layout, indices_N, offsets):
        """``staged_ids`` of the batch (a subclass may keep them per batch)."""
        return staged_ids(layout, indices_N, offsets, self.tables)

    def _stage(self, layout: Layout, indices_N, offsets, with_state: bool):
        unique, remapped = self._staged_ids(layout, indices_N, offsets)
        weights, states = [], []
        for t, ids in enumerate(unique):
            weight, state = self.read_rows(t, ids)
            weights.append(weight.to(self.device).contiguous())
            states.append({name: s.to(self.device).contiguous() for name, s in state.items()} if with_state else {})
        return unique, remapped.to(indices_N.dtype), weights, states

    def forward(self, layout: Layout, indices_N, offsets, per_sample_weights_N) -> torch.Tensor:
        _, remapped, weights, _ = self._stage(layout, indices_N, offsets, with_state=False)
        with torch._C._AutoDispatchBelowAutograd():
            return _ops.embedding_bag_forward.default(weights, *layout, remapped, offsets, per_sample_weights_N)

    def fused_update(self, optimizer, layout: Layout, indices_N, offsets, per_sample_weights_N, grad_output_BD) -> None:
        unique, remapped, weights, states = self._stage(layout, indices_N, offsets, with_state=True)
        optimizer.backward_(weights, states, layout, remapped, offsets, per_sample_weights_N, grad_output_BD)
        for t, ids in enumerate(unique):
            if ids.numel():
                self.write_rows(t, ids, weights[t], states[t])

    def row_grads(self, layout: Layout, indices_N, offsets, per_sample_weights_N, grad_output_BD) -> Tuple[List, List]:
        unique, remapped, weights, _ = self._stage(layout, indices_N, offsets, with_state=False)
        compact_ids, grads = _ops.embedding_bag_backward_row_grad(
            weights, *layout, remapped, offsets, per_sample_weights_N, grad_output_BD.contiguous()
        )
        return [ids.index_select(0, local) for ids, local in zip(unique, compact_ids)], list(grads)

    def per_sample_weights_grad(self, layout: Layout, indices_N, offsets, grad_output_BD) -> torch.Tensor:
        _, remapped, weights, _ = self._stage(layout, indices_N, offsets, with_state=False)
        return _ops.embedding_bag_per_sample_weights_grad(weights, *layout, remapped, offsets, grad_output_BD)
