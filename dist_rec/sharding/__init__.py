"""Distributing embedding tables over ranks.

``DistributedModelParallel`` shards a model's fused embedding collections
by a ``ShardingPlan`` (table-, row-, column-, table-row-wise or
data-parallel per table; ``ShardedEmbeddingBagCollection``) and keeps the
dense layers data-parallel. With ``replicas > 1`` the ranks form a 2D grid
(``grid.py``): tables sharded inside each group, groups synchronised as
replicas.
"""

from dist_rec.sharding.comm import COMM_STATS, CommStats
from dist_rec.sharding.dp_sharding import DataParallelUpdateExchange, data_parallel_embeddings
from dist_rec.sharding.grid import ShardingGrid, grid_ranks, make_grid
from dist_rec.sharding.model_parallel import DistributedModelParallel
from dist_rec.sharding.plan import SHARDING_TYPES, Shard, ShardingPlan, TableSharding, table_sharding, uniform_plan
from dist_rec.sharding.sharded_ebc import LocalShard, ShardedEmbeddingBagCollection

__all__ = [
    "COMM_STATS",
    "CommStats",
    "DataParallelUpdateExchange",
    "DistributedModelParallel",
    "LocalShard",
    "SHARDING_TYPES",
    "Shard",
    "ShardedEmbeddingBagCollection",
    "ShardingGrid",
    "ShardingPlan",
    "TableSharding",
    "data_parallel_embeddings",
    "grid_ranks",
    "make_grid",
    "table_sharding",
    "uniform_plan",
]
