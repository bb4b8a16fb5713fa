"""Distributing embedding tables over ranks.

For now one scheme: data-parallel tables (every rank a full copy, updates
agreed from all ranks' batches), ``dp_sharding``. Table-, row- and
column-wise sharding and 2D parallelism follow (see docs/roadmap.md).
"""

from dist_rec.sharding.dp_sharding import DataParallelUpdateExchange, data_parallel_embeddings

__all__ = ["DataParallelUpdateExchange", "data_parallel_embeddings"]
