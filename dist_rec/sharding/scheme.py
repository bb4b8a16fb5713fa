"""What differs between sharding types: how one feature's ids are routed
to a table's shards.

Each shard receives, per feature of its table, one bag per sample (possibly
empty) and pools it into its columns; the owner of the sample adds the
shards' pooled columns into place (``ShardedEmbeddingBagCollection``). So
table-, row-, column- and table-row-wise sharding differ only in which ids
a shard receives, and the output side needs no per-type code: a column
shard fills its columns, a row shard adds a partial sum (the reduce-scatter
of row-wise sharding).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from dist_rec.sharding.plan import Shard

# (lengths [B], ids local to the shard, per-id weights or None) for one shard.
Routed = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class ShardingScheme:
    """Routing of ids to the shards of one table; one subclass per type.

    ``route`` is the readable rule for one feature; ``router.Router``
    applies the same rule to a whole batch at once (and is tested against
    this one)."""

    sharding_type: str = ""
    bucketed: bool = False  # ids split by row range (row-wise) rather than sent whole to every shard

    def route(
        self, shards: Sequence[Shard], lengths: torch.Tensor, ids: torch.Tensor, weights: Optional[torch.Tensor]
    ) -> List[Routed]:
        raise NotImplementedError


class WholeRowsScheme(ShardingScheme):
    """Every shard holds all rows: each receives the feature's bags as they are."""

    def route(self, shards, lengths, ids, weights):
        return [(lengths, ids, weights)] * len(shards)
