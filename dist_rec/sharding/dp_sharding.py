"""Data-parallel embedding tables with a fused optimizer.

Every rank keeps a full copy of each table. A fused optimizer cannot average
gradients the way DDP does (no table gradient ever exists), so the backward
of each lookup gathers what the update is made of from all ranks, the ids
(with lengths and per-sample weights) and the gradient of the pooled output,
joins them into the global batch and applies one fused step to it on every
rank. Each touched row is then updated once with its gradient summed over
the global batch: N ranks with batch B train exactly as one process with
batch N x B (the output gradient is divided by N to match DDP's mean over
ranks). The copies start equal (broadcast from rank 0) and stay equal, as
every rank runs the same deterministic kernel on the same input.

What travels per step: the ids and lengths of every rank and its
``[B, sum of dims]`` output gradient. That suits tables that are small or
hot; big tables want table- or row-wise sharding.

The exchange runs on its own process group so that its collectives, issued
from inside autograd's backward, never interleave with DDP's all-reduces.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dist_rec.modules.embedding_modules import EmbeddingBagCollection
from dist_rec.sharding.comm import COMM_STATS, feature_major_order


class DataParallelUpdateExchange:
    """Joins all ranks' lookups and output gradients into the global batch.

    Called by ``EmbeddingBagCollection`` before a fused update with
    ``(layout, values, offsets, per_sample_weights, grad_output)`` of this
    rank; returns the same four for the global batch (ranks in order).
    """

    def __init__(self, process_group: dist.ProcessGroup) -> None:
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)

    def __call__(self, layout, values, offsets, per_sample_weights, grad_output):
        world = self.world_size
        num_features = len(layout[0])
        batch_size = grad_output.shape[0]
        weighted = per_sample_weights is not None
        layout_key = hash(tuple(tuple(x) for x in layout)) & 0x7FFFFFFFFFFF
        meta = torch.tensor(
            [batch_size, values.numel(), int(weighted), layout_key, grad_output.shape[1]],
            dtype=torch.int64,
            device=values.device,
        )
        metas = _all_gather_same_shape(meta, self.process_group)
        batch_sizes = [int(m[0]) for m in metas]
        value_counts = [int(m[1]) for m in metas]
        if len({(int(m[2]), int(m[3]), int(m[4])) for m in metas}) != 1:
            raise RuntimeError(
                "Data-parallel embedding update: ranks disagree on the features, their order, weights or output "
                f"width ({[m.tolist()[2:] for m in metas]}); every rank must feed the same keys in the same order."
            )

        lengths = (offsets[1:] - offsets[:-1]).to(torch.int64)
        ids_and_lengths = torch.cat([lengths, values.to(torch.int64)])
        gathered_ids = _all_gather_padded(ids_and_lengths, self.process_group)
        sent = ids_and_lengths.numel() * 8 + grad_output.numel() * grad_output.element_size()
        if weighted:
            sent += per_sample_weights.numel() * per_sample_weights.element_size()
        COMM_STATS.record("data_parallel", sent * (world - 1))
        gathered_grads = _all_gather_padded(grad_output.reshape(-1), self.process_group)
        gathered_weights = _all_gather_padded(per_sample_weights, self.process_group) if weighted else None

        rank_lengths: List[torch.Tensor] = []
        rank_values: List[torch.Tensor] = []
        rank_weights: List[torch.Tensor] = []
        rank_grads: List[torch.Tensor] = []
        for r in range(world):
            bags = num_features * batch_sizes[r]
            rank_lengths.append(gathered_ids[r][:bags].reshape(num_features, batch_sizes[r]))
            rank_values.append(gathered_ids[r][bags : bags + value_counts[r]])
            rank_grads.append(gathered_grads[r][: batch_sizes[r] * grad_output.shape[1]].reshape(batch_sizes[r], -1))
            if weighted:
                rank_weights.append(gathered_weights[r][: value_counts[r]])

        # Feature-major order of the global batch: feature f's bags of rank 0,
        # then of rank 1, ...; values regrouped to match.
        global_lengths = torch.cat(rank_lengths, dim=1)  # [F, sum B]
        order = feature_major_order(rank_lengths, value_counts)
        global_values = torch.cat(rank_values)[order].to(values.dtype)
        global_offsets = torch.zeros(global_lengths.numel() + 1, dtype=offsets.dtype, device=offsets.device)
        torch.cumsum(global_lengths.reshape(-1), 0, out=global_offsets[1:])
        global_weights = torch.cat(rank_weights)[order] if weighted else None
        global_grad = torch.cat(rank_grads).div_(world).contiguous()
        return global_values, global_offsets, global_weights, global_grad


def _all_gather_same_shape(tensor: torch.Tensor, group) -> List[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor, group=group)
    return out


def _all_gather_padded(tensor: torch.Tensor, group) -> List[torch.Tensor]:
    """All ranks' 1-D tensors, padded to the longest (callers trim)."""
    size = torch.tensor([tensor.numel()], dtype=torch.int64, device=tensor.device)
    longest = int(max(s for s in _all_gather_same_shape(size, group)))
    padded = tensor
    if tensor.numel() < longest:
        padded = torch.cat([tensor, tensor.new_zeros(longest - tensor.numel())])
    return _all_gather_same_shape(padded.contiguous(), group)


@torch.no_grad()
def data_parallel_embeddings(
    model: nn.Module, process_group: Optional[dist.ProcessGroup] = None
) -> List[Tuple[str, EmbeddingBagCollection]]:
    """Makes every fused ``EmbeddingBagCollection`` inside ``model``
    data-parallel over ``process_group`` (default: all ranks). A collective:
    every rank must call it. Tables and optimizer state are broadcast from
    the group's first rank. Returns the collections it changed, by name.

    Collections without a fused optimizer are left alone: their tables are
    ordinary parameters, and DDP averages their gradients.
    """
    ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
    # A group of our own, so our collectives never interleave with DDP's.
    exchange_group = dist.new_group(ranks=ranks)
    source = 0 if ranks is None else ranks[0]
    changed = []
    for name, module in model.named_modules():
        if not isinstance(module, EmbeddingBagCollection) or module.optimizer is None:
            continue
        for tensor in list(module.state_dict().values()) + [
            t for state in module.optimizer_state().values() for t in state.values()
        ]:
            dist.broadcast(tensor, src=source, group=exchange_group)
        module._update_exchange = DataParallelUpdateExchange(exchange_group)
        changed.append((name, module))
    return changed
