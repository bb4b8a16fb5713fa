"""What a sharding type decides, in one small class per type.

Every sharding type answers three questions, and nothing else differs
between them:

* **input dist**: which ids of a feature a shard receives: the feature's
  bags whole (table- and column-wise: every shard holds all rows), or only
  the ids of the shard's rows, made local to it (row-wise: bucketised by
  row range; ``route`` is the readable rule for one feature);
* **output dist**: how the shards' pooled columns become the feature's:
  column blocks side by side, or row shards' partial sums added (the
  reduce-scatter of row-wise sharding; mean pooling then divides after the
  sum, so a row shard pools sums);
* **update**: how a shard's rows are stepped in the backward: the fused
  kernel alone, or with the row-wise state agreed over the blocks of a row
  (column-wise), or from the global batch (data-parallel).

The collectives themselves are shared by all types: one input all-to-all
and one output all-to-all carry every table of a collection
(``input_dist.py``, ``output_dist.py``), where TorchRec runs a pair per
sharding type. The types contribute their rules to them.
"""

from __future__ import annotations

from typing import ClassVar, List, Optional, Sequence, Tuple

import torch

from dist_rec.modules.embedding_configs import PoolingType
from dist_rec.planner.plan import Shard, ShardingType

# (lengths [B], ids local to the shard, per-id weights or None) for one shard.
Routed = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class ShardingScheme:
    """The rules of one sharding type; one subclass per type.

    ``route`` is the readable rule for one feature; ``router.Router``
    applies the same rule to a whole batch at once (and is tested against
    this one)."""

    sharding_type: ClassVar[ShardingType]
    bucketed: ClassVar[bool] = False  # ids split by row range (row-wise) rather than sent whole to every shard

    def route(
        self, shards: Sequence[Shard], lengths: torch.Tensor, ids: torch.Tensor, weights: Optional[torch.Tensor]
    ) -> List[Routed]:
        raise NotImplementedError

    def shard_pooling(self, pooling: PoolingType) -> PoolingType:
        """How a shard pools its part of a bag: a row shard sums (the mean
        is taken after the shards' sums are joined); a shard that sees whole
        bags pools as the table does."""
        return PoolingType.SUM if self.bucketed else pooling

    def agrees_row_state(self, optimizer) -> bool:
        """Whether the shards of a row must agree its row-wise optimizer
        state before an update (blocks of one row on several ranks)."""
        return False


class WholeRowsScheme(ShardingScheme):
    """Every shard holds all rows: each receives the feature's bags as they are."""

    def route(self, shards, lengths, ids, weights):
        return [(lengths, ids, weights)] * len(shards)
