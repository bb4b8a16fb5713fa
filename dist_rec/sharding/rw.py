"""Row-wise sharding: contiguous row blocks of a table, one per rank.

Each id goes to the rank holding its row (bucketised by row range and made
local to the block); each rank pools the part of every bag that falls in
its rows, and the sample's owner adds the partial sums (a reduce-scatter).
Suits tables too big for one rank and spreads hot tables' lookups evenly.
"""

from __future__ import annotations

import torch

from dist_rec.planner.plan import ShardingType
from dist_rec.sharding.scheme import ShardingScheme


class RwSharding(ShardingScheme):
    """Input: each id to the shard of its row block, local to it. Output:
    every shard pools a partial sum of each bag; the owner of the sample
    adds them (then divides, for mean pooling)."""

    sharding_type = ShardingType.ROW_WISE
    bucketed = True

    def route(self, shards, lengths, ids, weights):
        """Stable split of the ids by row block: bag order is kept inside
        every block, and a bag with no id in a block is empty there."""
        num_shards, batch = len(shards), lengths.numel()
        starts = torch.tensor([s.row_offset for s in shards], dtype=ids.dtype, device=ids.device)
        block = torch.searchsorted(starts, ids, right=True) - 1  # shards are sorted by row_offset
        bag = torch.repeat_interleave(torch.arange(batch, device=ids.device), lengths.to(torch.int64), output_size=ids.numel())
        order = torch.argsort(block * batch + bag, stable=True)
        counts = torch.bincount(block * batch + bag, minlength=num_shards * batch).view(num_shards, batch)
        ids_by_block = torch.split(ids[order] - starts[block[order]], counts.sum(dim=1).tolist())
        weights_by_block = torch.split(weights[order], counts.sum(dim=1).tolist()) if weights is not None else [None] * num_shards
        return [(counts[k].to(lengths.dtype), ids_by_block[k], weights_by_block[k]) for k in range(num_shards)]
