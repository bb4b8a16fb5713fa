"""Planning: which rank holds which rows of each embedding table.

* ``ShardingPlan`` (``plan.py``): the plan itself, plain data: per table its
  ``ShardingType`` and shards (rank, rows, columns, storage location).
* ``Topology``: the ranks of one sharding group and their memory budgets.
* ``plan_sharding``: a greedy planner that balances expected lookups under
  the memory budgets and returns a ``ShardingPlan``;
  ``PlanningError`` when the tables do not fit. ``table_wise_plan``: its
  placement with every table table-wise.
* ``plan_summary`` / ``rank_stats``: each rank's memory and expected
  lookups under a plan, for logs.

The cost model is in ``cost.py``; docs/planner.md describes it and the
policy.
"""

from dist_rec.planner.cost import lookup_cost, table_bytes
from dist_rec.planner.greedy import (
    DEFAULT_ALLOWED_TYPES,
    DEFAULT_DATA_PARALLEL_MAX_BYTES,
    PlanningError,
    plan_sharding,
    table_wise_plan,
)
from dist_rec.planner.plan import (
    SHARDING_TYPES,
    Shard,
    ShardingPlan,
    ShardingType,
    TableSharding,
    even_splits,
    table_sharding,
    uniform_plan,
)
from dist_rec.planner.stats import RankStats, plan_summary, rank_stats
from dist_rec.planner.topology import Topology

__all__ = [
    "DEFAULT_ALLOWED_TYPES",
    "DEFAULT_DATA_PARALLEL_MAX_BYTES",
    "PlanningError",
    "RankStats",
    "SHARDING_TYPES",
    "Shard",
    "ShardingPlan",
    "ShardingType",
    "TableSharding",
    "Topology",
    "even_splits",
    "lookup_cost",
    "plan_sharding",
    "plan_summary",
    "rank_stats",
    "table_bytes",
    "table_sharding",
    "table_wise_plan",
    "uniform_plan",
]
