"""A tiered plan for a training job, from its own data: what
``sharding.type: planned`` runs before the model is sharded.

1. Access statistics of every table over the first ``stats_batches``
   global batches of the training stream (every rank counts the same
   stream, so every rank plans the same).
2. The tier model: measured once on ``tier_dir`` by the first rank
   (``tiers.json`` there), read by the others.
3. The placement: the RecShard MILP, or table-level greedy, under the
   per-rank memory (``fast_bytes``) and SSD (``slow_bytes``) budgets.
4. The plan, its figures and the statistics are saved beside the run's
   outputs (``plan.json``, ``placement.json``, ``access_stats/``), and the
   tables' row orders (hottest first) go to the sharded model, which keeps
   each table's hot rows in memory and the rest in ``tier_dir``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from dist_rec.planner.access_stats import PLOT_FILE, AccessStats, collect_access_stats
from dist_rec.planner.plan import ShardingPlan
from dist_rec.planner.recshard import RecShardResult, plan_recshard, table_demands, table_greedy
from dist_rec.planner.tiers import TierModel

TIER_MODEL_FILE = "tiers.json"


@dataclass
class TieredPlacement:
    """A tiered plan and what the sharded model needs with it."""

    plan: ShardingPlan
    row_orders: Dict[str, np.ndarray]
    result: RecShardResult
    stats: AccessStats
    tiers: TierModel

    def describe(self) -> str:
        r = self.result
        hot = sum(r.hot_rows.values())
        rows = sum(t.num_embeddings for t in self.plan.tables.values())
        costs = ", ".join(f"{1e3 * c:.2f}" for c in r.rank_cost_s)
        return (
            f"placement {r.method} ({r.status}, {r.solve_s:.2f} s): {hot:,} of {rows:,} rows in memory; expected "
            f"slow-tier reads per batch {r.slow_reads_per_batch:,.0f}; expected row-read cost per rank (ms/batch) {costs}"
        )


def plan_tiered_placement(
    tables: Sequence,
    dataset,
    world_size: int,
    global_batch_size: int,
    placement: str,
    fast_bytes: int,
    slow_bytes: Optional[int],
    tier_dir,
    stats_batches: int,
    output_dir=None,
    is_main: bool = True,
    barrier=lambda: None,
) -> TieredPlacement:
    """The tiered plan of ``tables`` over ``world_size`` ranks (see the
    module docstring). ``placement`` is "recshard" or "greedy";
    ``slow_bytes`` None is the free space of ``tier_dir``. ``barrier``
    makes the other ranks wait for the first one's tier calibration."""
    tier_dir = Path(tier_dir)
    tier_dir.mkdir(parents=True, exist_ok=True)
    stats = collect_access_stats(dataset, tables, num_batches=stats_batches, batch_size=global_batch_size)
    model_path = tier_dir / TIER_MODEL_FILE
    if is_main:
        TierModel.load_or_calibrate(model_path, directory=tier_dir, seconds=1.5, file_bytes=64 << 20)
    barrier()
    tiers = TierModel.load(model_path)
    demands = table_demands(tables, stats, tiers, global_batch_size)
    budgets = dict(fast_bytes=fast_bytes, slow_bytes=slow_bytes if slow_bytes else tiers.tier("ssd").capacity_bytes // world_size)
    if placement == "recshard":
        result = plan_recshard(demands, world_size, tiers, **budgets)
    elif placement == "greedy":
        result = table_greedy(demands, world_size, tiers, **budgets)
    else:
        raise ValueError(f"Invalid placement={placement!r}. Must be 'recshard' or 'greedy'.")
    # Only a table split between the tiers needs its rows in hottest-first order (8 bytes a row while it is built).
    row_orders = {name: stats[name].hot_order() for name, hot in result.hot_rows.items() if 0 < hot < stats[name].num_embeddings}
    if is_main and output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.plan.save(out / "plan.json")
        (out / "placement.json").write_text(json.dumps(result.summary(), indent=1) + "\n")
        stats.save(out / "access_stats")
        stats.plot_cdfs(out / "access_stats" / PLOT_FILE)
    return TieredPlacement(result.plan, row_orders, result, stats, tiers)
