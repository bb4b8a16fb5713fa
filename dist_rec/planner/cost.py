"""What a table costs a rank: bytes of memory and expected lookups per step.

The planner and ``plan_summary`` share this model, so the summary shows the
numbers the planner balanced.

Memory of a shard of ``r`` rows and ``c`` columns::

    r * c * bytes_per_element(data_type) + r * 4 * len(optimizer.state_names)

(each fused optimizer state is one float32 per row, and every column shard
keeps its own copy of it). A data-parallel table costs its full size on
every rank.

Lookup cost of a table, for one rank's batch::

    sum over its features f of expected_ids_per_batch[f] * embedding_dim

(embedding elements read; a feature without an entry is taken as one id per
sample, ``batch_size_per_rank`` ids). A sharded table serves the batches of
all ``world_size`` ranks, spread over its shards in proportion to the rows and
columns each holds (ids assumed uniform over rows). A data-parallel table
serves only the rank's own batch, on every rank, so it adds the same cost
everywhere and never tilts the balance.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from dist_rec.modules.embedding_configs import EmbeddingBagConfig, as_embedding_bag_config
from dist_rec.planner.plan import ShardingType, TableSharding

# Bytes of one optimizer state value: fused optimizers keep float32 per row.
STATE_BYTES = 4

DEFAULT_BATCH_SIZE_PER_RANK = 512


def num_state_values(optimizer) -> int:
    """Float32 values per row that ``optimizer`` keeps (0 for None or SGD)."""
    return 0 if optimizer is None else len(getattr(optimizer, "state_names", ()))


def shard_bytes(config: EmbeddingBagConfig, num_rows: int, num_cols: int, optimizer=None) -> int:
    """Bytes of ``num_rows x num_cols`` of ``config``'s table plus the
    optimizer state of those rows."""
    return num_rows * (num_cols * config.dtype.itemsize + STATE_BYTES * num_state_values(optimizer))


def table_bytes(config: EmbeddingBagConfig, optimizer=None) -> int:
    """Bytes of the whole table with its optimizer state."""
    return shard_bytes(config, config.num_embeddings, config.embedding_dim, optimizer)


def as_configs(tables: Sequence) -> List[EmbeddingBagConfig]:
    """Our configs from ours or TorchRec's; refuses duplicate table names."""
    configs = [as_embedding_bag_config(t) for t in tables]
    seen = set()
    for c in configs:
        if c.name in seen:
            raise ValueError(f"Invalid tables: table name {c.name!r} appears twice. Must be unique.")
        seen.add(c.name)
    return configs


def check_batch_inputs(
    configs: Sequence[EmbeddingBagConfig],
    expected_ids_per_batch: Optional[Mapping[str, float]],
    batch_size_per_rank: int,
) -> None:
    if isinstance(batch_size_per_rank, bool) or not isinstance(batch_size_per_rank, int) or batch_size_per_rank < 1:
        raise ValueError(f"Invalid batch_size_per_rank={batch_size_per_rank!r}. Must be an int >= 1.")
    if not expected_ids_per_batch:
        return
    features = {f for c in configs for f in c.feature_names}
    unknown = sorted(set(expected_ids_per_batch) - features)
    if unknown:
        raise ValueError(
            f"Invalid expected_ids_per_batch: features {unknown} are read by no table. "
            "Must name features of the tables."
        )
    for feature, ids in expected_ids_per_batch.items():
        if isinstance(ids, bool) or not isinstance(ids, (int, float)) or not math.isfinite(ids) or ids < 0:
            raise ValueError(f"Invalid expected_ids_per_batch[{feature!r}]={ids!r}. Must be a finite number >= 0.")


def lookup_cost(
    config: EmbeddingBagConfig,
    expected_ids_per_batch: Optional[Mapping[str, float]] = None,
    batch_size_per_rank: int = DEFAULT_BATCH_SIZE_PER_RANK,
) -> float:
    """Embedding elements read for one rank's batch: expected ids of each of
    the table's features times ``embedding_dim``, summed."""
    ids = expected_ids_per_batch or {}
    return float(sum(ids.get(f, batch_size_per_rank) for f in config.feature_names)) * config.embedding_dim


def rank_loads(
    sharding: TableSharding,
    config: EmbeddingBagConfig,
    cost: float,
    world_size: int,
    optimizer=None,
) -> List[Tuple[int, int, float]]:
    """``(rank, bytes, lookup cost)`` that ``sharding`` puts on each rank it
    touches; ``cost`` is the table's ``lookup_cost`` for one rank's batch."""
    if sharding.sharding_type == ShardingType.DATA_PARALLEL:
        full = table_bytes(config, optimizer)
        return [(r, full, cost) for r in range(world_size)]
    # A sharded table serves all world_size ranks' batches.
    group_cost = cost * world_size
    area = config.num_embeddings * config.embedding_dim
    return [
        (s.rank, shard_bytes(config, s.num_rows, s.num_cols, optimizer), group_cost * s.num_rows * s.num_cols / area)
        for s in sharding.shards
    ]


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def format_count(x: float) -> str:
    """``1234567`` -> ``"1.23M"``."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def table_costs(configs: Sequence[EmbeddingBagConfig], expected_ids_per_batch, batch_size_per_rank) -> Dict[str, float]:
    """``lookup_cost`` of each table, by name."""
    return {c.name: lookup_cost(c, expected_ids_per_batch, batch_size_per_rank) for c in configs}
