"""Distributing embedding tables over ranks.

``DistributedModelParallel`` shards a model's fused embedding collections
by a ``ShardingPlan`` (table-, row-, column-, table-row-wise or
data-parallel per table; ``ShardedEmbeddingBagCollection``) and keeps the
dense layers data-parallel. With ``replicas > 1`` the ranks form a 2D grid
(``dist_rec.distributed``): tables sharded inside each group, groups
synchronised as replicas.

Layout: one file per sharding type's rules (``tw``, ``rw``, ``cw``,
``twrw``, ``dp``; their base in ``scheme.py``), the shared collectives of
a collection (``input_dist.py``, ``output_dist.py``, ``comm.py``), its
slots (``slots.py``) and local lookups (``lookup.py``), the collection
(``sharded_ebc.py``), the model wrapper (``model_parallel.py``) and the
train pipeline (``pipeline.py``).
"""

from dist_rec.planner.plan import SHARDING_TYPES, Shard, ShardingPlan, ShardingType, TableSharding, table_sharding, uniform_plan
from dist_rec.sharding.comm import COMM_STATS, CommStats
from dist_rec.sharding.dp import DataParallelUpdateExchange, data_parallel_embeddings
from dist_rec.sharding.model_parallel import DistributedModelParallel
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
    "ShardingPlan",
    "ShardingType",
    "TableSharding",
    "data_parallel_embeddings",
    "table_sharding",
    "uniform_plan",
]
