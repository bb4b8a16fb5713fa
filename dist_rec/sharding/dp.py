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

The exchange runs on its own process group (from the process-group owner)
so that its collectives, issued from inside autograd's backward, never
interleave with DDP's all-reduces.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_rec.modules.embedding_modules import EmbeddingBagCollection
from dist_rec.planner.plan import ShardingType
from dist_rec.sharding.comm import COMM_STATS, feature_major
from dist_rec.sharding.lookup import UpdateRule
from dist_rec.sharding.scheme import ShardingScheme

EXCHANGE_GROUP = "data_parallel_exchange"  # the process-group owner's name for the exchange's group


class DpSharding(ShardingScheme):
    """Input: no ids move (every rank looks up its own batch in its own
    copy). Output: none either. Update: from the global batch
    (``DataParallelUpdate``), so the copies stay equal."""

    sharding_type = ShardingType.DATA_PARALLEL


class DataParallelUpdateExchange:
    """Joins all ranks' lookups and output gradients into the global batch.

    Called with ``(layout, values, offsets, per_sample_weights, grad_output)``
    of this rank; returns the same four for the global batch (ranks in
    order). Its group is the owner's ``EXCHANGE_GROUP`` (every rank), asked
    for at each call so that a rebuild of the groups is picked up.
    """

    def __init__(self, process_groups) -> None:
        self.process_groups = process_groups
        process_groups.subgroup(EXCHANGE_GROUP)  # made now: a collective, on every rank alike

    @property
    def process_group(self) -> dist.ProcessGroup:
        return self.process_groups.group(EXCHANGE_GROUP)

    def __call__(self, layout, values, offsets, per_sample_weights, grad_output):
        group = self.process_group
        world = dist.get_world_size(group)
        num_features = len(layout[0])
        batch_size = grad_output.shape[0]
        weighted = per_sample_weights is not None
        layout_key = hash(tuple(tuple(x) for x in layout)) & 0x7FFFFFFFFFFF
        meta = torch.tensor(
            [batch_size, values.numel(), int(weighted), layout_key, grad_output.shape[1]],
            dtype=torch.int64,
            device=values.device,
        )
        metas = _all_gather_same_shape(meta, group)
        batch_sizes = [int(m[0]) for m in metas]
        value_counts = [int(m[1]) for m in metas]
        if len({(int(m[2]), int(m[3]), int(m[4])) for m in metas}) != 1:
            raise RuntimeError(
                "Data-parallel embedding update: ranks disagree on the features, their order, weights or output "
                f"width ({[m.tolist()[2:] for m in metas]}); every rank must feed the same keys in the same order."
            )

        lengths = (offsets[1:] - offsets[:-1]).to(torch.int64)
        ids_and_lengths = torch.cat([lengths, values.to(torch.int64)])
        gathered_ids = _all_gather_padded(ids_and_lengths, group)
        sent = ids_and_lengths.numel() * 8 + grad_output.numel() * grad_output.element_size()
        if weighted:
            sent += per_sample_weights.numel() * per_sample_weights.element_size()
        COMM_STATS.record("data_parallel", sent * (world - 1))
        gathered_grads = _all_gather_padded(grad_output.reshape(-1), group)
        gathered_weights = _all_gather_padded(per_sample_weights, group) if weighted else None

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
        global_values = feature_major(rank_lengths, rank_values).to(values.dtype)
        global_offsets = torch.zeros(global_lengths.numel() + 1, dtype=offsets.dtype, device=offsets.device)
        torch.cumsum(global_lengths.reshape(-1), 0, out=global_offsets[1:])
        global_weights = feature_major(rank_lengths, rank_weights) if weighted else None
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


class DataParallelUpdate(UpdateRule):
    """The fused update of data-parallel tables: on the global batch, which
    ``exchange`` joins from every rank's ids and output gradient."""

    def __init__(self, exchange: DataParallelUpdateExchange) -> None:
        self.exchange = exchange

    def __call__(self, storage, optimizer, layout, indices_N, offsets, weights_N, grad_output) -> None:
        indices_N, offsets, weights_N, grad_output = self.exchange(layout, indices_N, offsets, weights_N, grad_output)
        storage.fused_update(optimizer, layout, indices_N, offsets, weights_N, grad_output)


def data_parallel_embeddings(module: nn.Module, process_groups=None) -> nn.Module:
    """Makes every fused ``EmbeddingBagCollection`` in ``module`` (or
    ``module`` itself, if it is one) data-parallel: each becomes a
    ``ShardedEmbeddingBagCollection`` whose tables are all data-parallel,
    starting from its rows (rank 0's copy, broadcast), every update agreed
    from the global batch. A collective: every rank calls it. Returns the
    module (the new collection when ``module`` was one).

    Collections without a fused optimizer are left alone: their tables are
    ordinary parameters, and DDP averages their gradients.
    """
    from dist_rec.planner.plan import ShardingPlan, table_sharding
    from dist_rec.sharding.sharded_ebc import ShardedEmbeddingBagCollection

    def convert(collection: EmbeddingBagCollection) -> nn.Module:
        configs = collection.embedding_bag_configs()
        plan = ShardingPlan(process_groups.grid.group_size, {
            c.name: table_sharding(c.name, c.num_embeddings, c.embedding_dim, ShardingType.DATA_PARALLEL) for c in configs
        })
        return ShardedEmbeddingBagCollection(
            configs, plan, collection.optimizer, is_weighted=collection.is_weighted(), device=collection.device,
            source=collection, process_groups=process_groups,
        )

    if process_groups is None:
        from dist_rec.distributed import default_process_groups

        process_groups = default_process_groups()
    if isinstance(module, EmbeddingBagCollection):
        return convert(module) if module.optimizer is not None else module
    fused = [(path, m) for path, m in module.named_modules() if isinstance(m, EmbeddingBagCollection) and m.optimizer is not None]
    for path, collection in fused:
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, name, convert(collection))
    return module
