"""Per-rank memory and expected lookups of a plan, for logs and reviews."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence

from dist_rec.planner.cost import (
    DEFAULT_BATCH_SIZE_PER_RANK,
    as_configs,
    check_batch_inputs,
    format_bytes,
    format_count,
    rank_loads,
    table_costs,
)
from dist_rec.planner.greedy import SHORT_NAMES
from dist_rec.planner.topology import Topology
from dist_rec.planner.plan import ShardingPlan, ShardingType

_MAX_TABLES_SHOWN = 6


@dataclass
class RankStats:
    """What a plan puts on one rank.

    Args:
        rank (int): the rank in the sharding group.
        memory_bytes (int): table weights and optimizer state held.
        lookup_cost (float): expected embedding elements read per step.
        tables (List[str]): tables with a shard here; non-table-wise ones
            carry their type, e.g. ``"t3 (rw)"``.
        budget_bytes (Optional[int]): the rank's budget, when a topology was given.
    """

    rank: int
    memory_bytes: int = 0
    lookup_cost: float = 0.0
    tables: List[str] = field(default_factory=list)
    budget_bytes: Optional[int] = None


def rank_stats(
    plan: ShardingPlan,
    tables: Sequence,
    optimizer=None,
    expected_ids_per_batch: Optional[Mapping[str, float]] = None,
    batch_size_per_rank: int = DEFAULT_BATCH_SIZE_PER_RANK,
    topology: Optional[Topology] = None,
) -> List[RankStats]:
    """``RankStats`` of each rank of ``plan``, under the planner's cost model
    (same arguments as ``plan_sharding``)."""
    configs = {c.name: c for c in as_configs(tables)}
    plan.validate(configs)
    if topology is not None and topology.world_size != plan.world_size:
        raise ValueError(
            f"Invalid topology: world_size={topology.world_size} but the plan is over {plan.world_size} ranks."
        )
    for sharding in plan.tables.values():
        c = configs[sharding.table]
        if (sharding.num_embeddings, sharding.embedding_dim) != (c.num_embeddings, c.embedding_dim):
            raise ValueError(
                f"The plan has table {c.name!r} as {sharding.num_embeddings} x {sharding.embedding_dim}; "
                f"the model's is {c.num_embeddings} x {c.embedding_dim}."
            )
    check_batch_inputs(list(configs.values()), expected_ids_per_batch, batch_size_per_rank)
    costs = table_costs(list(configs.values()), expected_ids_per_batch, batch_size_per_rank)
    stats = [
        RankStats(r, budget_bytes=None if topology is None else topology.budgets[r]) for r in range(plan.world_size)
    ]
    for sharding in plan.tables.values():
        label = sharding.table
        if sharding.sharding_type != ShardingType.TABLE_WISE:
            label += f" ({SHORT_NAMES[sharding.sharding_type]})"
        for rank, nbytes, cost in rank_loads(
            sharding, configs[sharding.table], costs[sharding.table], plan.world_size, optimizer
        ):
            stats[rank].memory_bytes += nbytes
            stats[rank].lookup_cost += cost
            stats[rank].tables.append(label)
    return stats


def plan_summary(
    plan: ShardingPlan,
    tables: Sequence,
    optimizer=None,
    expected_ids_per_batch: Optional[Mapping[str, float]] = None,
    batch_size_per_rank: int = DEFAULT_BATCH_SIZE_PER_RANK,
    topology: Optional[Topology] = None,
) -> str:
    """A printable table of each rank's memory and expected lookups, with
    the imbalance (slowest rank over the mean) on the first line.

    Example output::

        Plan over 2 ranks: 8.6 MiB of tables and state, 65.5k lookups per step (max / mean rank 1.00)
        rank | memory  | budget  | used  | lookups / step | tables
        -----+---------+---------+-------+----------------+---------------------
        0    | 4.3 MiB | 5.0 MiB | 86.1% | 32.8k          | t0, t2 (rw), t3 (dp)
        1    | 4.3 MiB | 5.0 MiB | 86.1% | 32.8k          | t1, t2 (rw), t3 (dp)
    """
    stats = rank_stats(plan, tables, optimizer, expected_ids_per_batch, batch_size_per_rank, topology)
    total_bytes = sum(s.memory_bytes for s in stats)
    total_cost = sum(s.lookup_cost for s in stats)
    mean_cost = total_cost / len(stats)
    imbalance = max(s.lookup_cost for s in stats) / mean_cost if mean_cost > 0 else 1.0
    with_budget = topology is not None
    header = ["rank", "memory"] + (["budget", "used"] if with_budget else []) + ["lookups / step", "tables"]
    rows = [header]
    for s in stats:
        shown = ", ".join(s.tables[:_MAX_TABLES_SHOWN])
        if len(s.tables) > _MAX_TABLES_SHOWN:
            shown += f", +{len(s.tables) - _MAX_TABLES_SHOWN} more"
        budget = (
            [format_bytes(s.budget_bytes), f"{100.0 * s.memory_bytes / s.budget_bytes:.1f}%"] if with_budget else []
        )
        rows.append([str(s.rank), format_bytes(s.memory_bytes)] + budget + [format_count(s.lookup_cost), shown or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    title = (
        f"Plan over {plan.world_size} ranks: {format_bytes(total_bytes)} of tables and state, "
        f"{format_count(total_cost)} lookups per step (max / mean rank {imbalance:.2f})"
    )
    return title + "\n" + "\n".join(lines)
