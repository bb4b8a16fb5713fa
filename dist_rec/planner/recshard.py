"""RecShard: tables on ranks and each table's hottest rows in fast memory,
chosen by a MILP over access statistics (Sethi et al., ASPLOS 2022).

Size-based sharders treat every row of a table alike. Embedding reads are
skewed: a small share of a table's rows serves most of its reads, and the
rows a hash never produces are never read at all. RecShard therefore plans
per table *how many* of its hottest rows go to the fast tier (the rest to a
slow one), and on *which rank* the table lives, so that the slowest rank's
expected cost per batch is as low as it can be under every rank's fast and
slow capacities.

The model (``docs/planner.md``; ``DESIGN.md`` gives the first form). For
table ``t`` on rank ``g`` keeping the hottest fraction ``f`` of its rows
fast, the expected cost per batch is
``A_t * (F_t(f) * c_fast_t + (1 - F_t(f)) * c_slow_t)``: ``A_t`` reads per
global batch (table-wise: one rank serves them all), ``F_t`` the access CDF
over rows sorted hottest first, ``c`` the seconds one random row read costs
in each tier (``TierModel``). A binary ``x[t, g, j]`` picks for each table
one rank and one hot fraction ``f_tj`` from a grid (``k / K``, plus the
fraction of rows ever read, past which hot rows buy nothing):

    min   C  (+ a tie-break: the total cost, weighted 1e-6)
    s.t.  sum_{g, j} x[t, g, j] = 1                                    each t
          sum_{t, j} x[t, g, j] * cost_tj                   <= C       each g
          sum_{t, j} x[t, g, j] * hot_rows_tj  * row_bytes_t <= fast_g  each g
          sum_{t, j} x[t, g, j] * cold_rows_tj * row_bytes_t <= slow_g  each g

This is the DESIGN formulation with its product ``z = a * y`` folded into
one variable per (table, rank, fraction): the same solutions, no linking
constraints, a tighter relaxation. HiGHS solves it (``scipy.optimize.milp``)
within ``time_limit_s``, keeping the best solution found; a greedy plan
(``greedy_recshard``) is computed first and wins when the solver returns
nothing better. ``table_greedy`` is the baseline RecShard is measured
against: whole tables in fast memory, largest first, until it is full.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from dist_rec.modules.embedding_configs import as_embedding_bag_config
from dist_rec.placement.location import EmbeddingLocation
from dist_rec.planner.access_stats import AccessStats
from dist_rec.planner.cost import format_bytes
from dist_rec.planner.greedy import PlanningError
from dist_rec.planner.plan import Shard, ShardingPlan, ShardingType, TableSharding
from dist_rec.planner.tiers import TierModel

DEFAULT_GRID = 20  # hot fractions 0, 1/20, ..., 1
DEFAULT_TIME_LIMIT_S = 30.0
# Above this many binaries on several ranks the joint MILP is solved in parts (``_solve_decomposed``): the
# ranks are interchangeable, and HiGHS spends its time on their symmetric assignments (1,000 tables on 8
# ranks, 176k binaries: a 92% gap after 60 s).
MAX_JOINT_BINARIES = 20_000
STATE_BYTES_PER_ROW = 4  # row-wise AdaGrad: one float32 accumulator per row
_TIE_BREAK = 1e-6  # weight of the total cost next to the slowest rank's


@dataclass
class TableDemand:
    """What the planner needs of one table.

    Args:
        name (str): the table.
        num_rows (int): its rows.
        row_bytes (int): bytes one row takes in a tier (weights plus its
            optimizer state).
        reads_per_batch (float): expected row reads per global batch.
        cdf (np.ndarray): float64 ``[num_rows + 1]``, the share of reads the
            ``r`` hottest rows serve (``TableAccessStats.cdf``).
        used_rows (int): rows worth keeping hot: those read in the sample, or
            all rows when the sample's tail says unseen rows get reads
            (``estimated_cdf``).
        embedding_dim (int): the table's width.
        read_seconds (Dict[str, float]): seconds of one random row read per
            tier name.
    """

    name: str
    num_rows: int
    row_bytes: int
    reads_per_batch: float
    cdf: np.ndarray
    used_rows: int
    embedding_dim: int
    read_seconds: Dict[str, float] = field(default_factory=dict)

    def hot_rows_at(self, fraction: float) -> int:
        return int(round(fraction * self.num_rows))

    def cost(self, hot_rows: int, fast: str, slow: str) -> float:
        """Expected seconds per batch of this table's reads with its
        ``hot_rows`` hottest rows in ``fast`` and the rest in ``slow``."""
        share = float(self.cdf[hot_rows])
        return self.reads_per_batch * (share * self.read_seconds[fast] + (1.0 - share) * self.read_seconds[slow])


@dataclass
class RecShardResult:
    """A tiered plan and the figures behind it.

    ``plan`` is table-wise; a shard keeps its ``hot_rows`` hottest rows (in
    the order of ``AccessStats``' ``hot_order``) at the fast location and
    the rest at the slow one. ``rank_cost_s`` is each rank's expected cost
    per batch (seconds of row reads), ``slow_reads_per_batch`` the expected
    slow-tier reads per batch over all ranks."""

    plan: ShardingPlan
    method: str  # "milp", "greedy" (RecShard's greedy) or "table_greedy"
    hot_rows: Dict[str, int]
    rank_of: Dict[str, int]
    rank_cost_s: List[float]
    slow_reads_per_batch: float
    solve_s: float
    status: str  # the solver's: "optimal", a time limit with its gap, or why it found nothing
    candidate_costs_s: Dict[str, float] = field(default_factory=dict)  # slowest rank's cost of each plan tried
    lower_bound_s: Optional[float] = None  # no plan on the grid beats it (solved in parts: ``_solve_decomposed``)

    @property
    def max_rank_cost_s(self) -> float:
        return max(self.rank_cost_s) if self.rank_cost_s else 0.0

    def summary(self) -> Dict:
        return {
            "method": self.method,
            "status": self.status,
            "solve_s": self.solve_s,
            "candidate_costs_ms": {k: 1e3 * v for k, v in self.candidate_costs_s.items()},
            "lower_bound_ms": None if self.lower_bound_s is None else 1e3 * self.lower_bound_s,
            "rank_cost_ms": [1e3 * c for c in self.rank_cost_s],
            "slow_reads_per_batch": self.slow_reads_per_batch,
            "hot_rows": dict(self.hot_rows),
            "rank_of": dict(self.rank_of),
        }


def table_demands(
    tables: Sequence,
    stats: AccessStats,
    tiers: TierModel,
    global_batch_size: int,
    weight_bytes: int = 4,
    state_bytes_per_row: int = STATE_BYTES_PER_ROW,
) -> List[TableDemand]:
    """The planner's view of ``tables`` (our or TorchRec's configs) from
    their statistics: reads per global batch of ``global_batch_size``
    samples, CDF, row bytes and per-tier read costs."""
    demands = []
    for table in tables:
        config = as_embedding_bag_config(table)
        if config.name not in stats:
            raise ValueError(f"No access statistics for table {config.name!r}; they cover {sorted(stats.tables)}.")
        s = stats[config.name]
        if s.num_embeddings != config.num_embeddings:
            raise ValueError(
                f"The access statistics of table {config.name!r} count {s.num_embeddings} rows; the table has "
                f"{config.num_embeddings}. Profile the data again for these tables."
            )
        row_bytes = config.embedding_dim * weight_bytes + state_bytes_per_row
        cdf, used_rows = estimated_cdf(s)
        demands.append(
            TableDemand(
                name=config.name,
                num_rows=config.num_embeddings,
                row_bytes=row_bytes,
                reads_per_batch=s.accesses_per_sample * global_batch_size,
                cdf=cdf,
                used_rows=used_rows,
                embedding_dim=config.embedding_dim,
                read_seconds={t.name: t.seconds_per_row(config.embedding_dim * weight_bytes) for t in tiers.tiers},
            )
        )
    return demands


def estimated_cdf(stats) -> "tuple[np.ndarray, int]":
    """``(CDF, rows worth keeping hot)`` of a table's reads to come, from a
    sample of them. A sample misses rows: those it never saw still get reads
    (a hashed id space has a long tail). The share of reads going to rows
    the sample never saw is estimated as Good-Turing does, by the share of
    reads to rows seen exactly once; it is spread evenly over the unseen
    rows (they rank after every seen row), and the seen rows' shares shrink
    to make room. Without rows seen once (or without unseen rows) the
    sample's own CDF stands, and rows past the last one read are worth
    nothing."""
    cdf = stats.cdf()
    total, used, rows = stats.total_accesses, stats.used_rows, stats.num_embeddings
    singletons = int(np.count_nonzero(stats.counts == 1))
    if total == 0 or used == rows or singletons == 0:
        return cdf, used
    unseen = min(1.0, singletons / total)
    estimate = cdf * (1.0 - unseen)
    estimate[used:] = (1.0 - unseen) + unseen * np.arange(rows - used + 1) / (rows - used)
    return estimate, rows


def _candidates(demand: TableDemand, grid: int) -> List[int]:
    """Hot-row counts a table may choose: the grid's, and its used rows."""
    counts = {demand.hot_rows_at(k / grid) for k in range(grid + 1)}
    counts.add(demand.used_rows)
    return sorted(counts)


def _capacities(tiers: TierModel, fast: str, slow: str, world_size: int, fast_bytes, slow_bytes):
    def per_rank(value, tier_name):
        if value is None:
            value = tiers.tier(tier_name).capacity_bytes
        values = list(value) if isinstance(value, (list, tuple)) else [value] * world_size
        if len(values) != world_size:
            raise ValueError(f"Invalid {tier_name} capacities {values}: one per rank ({world_size}) expected.")
        return [int(v) for v in values]

    return per_rank(fast_bytes, fast), per_rank(slow_bytes, slow)


def plan_recshard(
    demands: Sequence[TableDemand],
    world_size: int,
    tiers: TierModel,
    fast: str = "device",
    slow: str = "ssd",
    fast_bytes=None,
    slow_bytes=None,
    grid: int = DEFAULT_GRID,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    use_milp: bool = True,
) -> RecShardResult:
    """The RecShard plan of ``demands`` over ``world_size`` ranks.

    Args:
        demands: ``table_demands(...)``.
        tiers (TierModel): read costs, and the capacities when
            ``fast_bytes`` / ``slow_bytes`` are not given.
        fast, slow (str): tier names (``EmbeddingLocation`` values).
        fast_bytes, slow_bytes: per-rank budgets (one int for all ranks,
            or one per rank). (Default: the tier model's capacities)
        grid (int): hot fractions ``k / grid`` are considered.
        time_limit_s (float): the solver's bound; its best solution is kept.
        use_milp (bool): False gives the greedy plan alone.

    Raises:
        PlanningError: the tables do not fit even with every row in either
            tier; the message names the tables and the ranks' budgets.
    """
    fast = EmbeddingLocation.from_str(fast, "for the fast tier").value
    slow = EmbeddingLocation.from_str(slow, "for the slow tier").value
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"Invalid grid={grid!r}. Must be an int >= 1.")
    if world_size < 1:
        raise ValueError(f"Invalid world_size={world_size!r}. Must be >= 1.")
    fast_cap, slow_cap = _capacities(tiers, fast, slow, world_size, fast_bytes, slow_bytes)
    _check_fits(demands, fast, slow, fast_cap, slow_cap)
    started = time.perf_counter()
    lower_bound = None
    greedy = _greedy_choice(demands, world_size, fast, slow, fast_cap, slow_cap)
    candidates = {"greedy": _max_cost(greedy, demands, world_size, fast, slow)}
    best, method, status = greedy, "greedy", "greedy"
    if use_milp and demands:
        binaries = world_size * sum(len(_candidates(d, grid)) for d in demands)
        if world_size > 1 and binaries > MAX_JOINT_BINARIES:
            bound: List[float] = []
            solved, status = _solve_decomposed(demands, world_size, fast, slow, fast_cap, slow_cap, grid, time_limit_s,
                                               bound=bound)  # fmt: skip
            lower_bound = bound[0] if bound else None
            name = "milp_decomposed"
        else:
            solved, status = _solve_milp(demands, world_size, fast, slow, fast_cap, slow_cap, grid, time_limit_s)
            name = "milp"
        candidates[name] = _max_cost(solved, demands, world_size, fast, slow)
        # The greedy plan moves rows in finer steps than the grid: it can win.
        if solved is not None and candidates[name] <= candidates["greedy"] * (1 + 1e-12):
            best, method = solved, name
    if best is None:
        raise PlanningError(_not_fit_message(demands, fast, slow, fast_cap, slow_cap), [d.name for d in demands])
    best = _trim_unread_hot_rows(best, demands, world_size, slow_cap)
    result = _result(best, demands, world_size, fast, slow, method, status, time.perf_counter() - started)
    result.candidate_costs_s = candidates
    result.lower_bound_s = lower_bound
    return result


def greedy_recshard(demands, world_size, tiers, fast="device", slow="ssd", fast_bytes=None, slow_bytes=None):
    """RecShard's greedy plan (no solver): ``plan_recshard(use_milp=False)``."""
    return plan_recshard(demands, world_size, tiers, fast, slow, fast_bytes, slow_bytes, use_milp=False)


def table_greedy(demands, world_size, tiers, fast="device", slow="ssd", fast_bytes=None, slow_bytes=None) -> RecShardResult:
    """The size-greedy baseline: tables largest first, each on the rank
    with the most fast memory left, whole in fast memory while it fits
    there and whole in the slow tier otherwise (as a sharder that places
    tables, not rows, would)."""
    fast = EmbeddingLocation.from_str(fast).value
    slow = EmbeddingLocation.from_str(slow).value
    fast_cap, slow_cap = _capacities(tiers, fast, slow, world_size, fast_bytes, slow_bytes)
    _check_fits(demands, fast, slow, fast_cap, slow_cap)
    started = time.perf_counter()
    fast_left, slow_left = list(fast_cap), list(slow_cap)
    choice = {}
    for d in sorted(demands, key=lambda d: (-d.num_rows * d.row_bytes, d.name)):
        size = d.num_rows * d.row_bytes
        rank = max(range(world_size), key=lambda g: (fast_left[g], slow_left[g], -g))
        if size <= fast_left[rank]:
            fast_left[rank] -= size
            choice[d.name] = (rank, d.num_rows)
            continue
        rank = max(range(world_size), key=lambda g: (slow_left[g], -g))
        if size > slow_left[rank]:
            raise PlanningError(_not_fit_message(demands, fast, slow, fast_cap, slow_cap), [d.name])
        slow_left[rank] -= size
        choice[d.name] = (rank, 0)
    return _result(choice, demands, world_size, fast, slow, "table_greedy", "greedy", time.perf_counter() - started)


# -- the solver ------------------------------------------------------------------


def _solve_milp(demands, world_size, fast, slow, fast_cap, slow_cap, grid, time_limit_s, bound=None):
    """``(choice or None, status text)`` from HiGHS. ``bound`` (a list)
    receives the solver's lower bound on the slowest rank's cost (seconds)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    # Columns: x[t, g, j] for each table's candidates, then C (last).
    cols_table, cols_rank, cols_hot, cols_cost, cols_fast_b, cols_slow_b = [], [], [], [], [], []
    for t, d in enumerate(demands):
        for hot in _candidates(d, grid):
            cost = d.cost(hot, fast, slow)
            for g in range(world_size):
                cols_table.append(t)
                cols_rank.append(g)
                cols_hot.append(hot)
                cols_cost.append(cost)
                cols_fast_b.append(hot * d.row_bytes)
                cols_slow_b.append((d.num_rows - hot) * d.row_bytes)
    n = len(cols_table)
    table_ix, rank_ix = np.array(cols_table), np.array(cols_rank)
    cost, fast_b, slow_b = np.array(cols_cost), np.array(cols_fast_b, dtype=np.float64), np.array(cols_slow_b, dtype=np.float64)
    # Costs in units of the largest single-table cost: HiGHS tolerances are absolute.
    scale = float(cost.max()) if cost.size and cost.max() > 0 else 1.0
    cost = cost / scale
    columns = np.arange(n)
    G, T = world_size, len(demands)
    rows, cols, values, lower, upper = [], [], [], [], []

    def block(row_of_col, coefficient, row_base, lo, hi, count):
        rows.append(row_base + row_of_col)
        cols.append(columns)
        values.append(coefficient)
        lower.extend(lo)
        upper.extend(hi)

    block(table_ix, np.ones(n), 0, [1.0] * T, [1.0] * T, T)  # one (rank, fraction) per table
    base = T
    block(rank_ix, cost, base, [-np.inf] * G, [0.0] * G, G)  # cost_g - C <= 0
    rows.append(base + np.arange(G))
    cols.append(np.full(G, n))
    values.append(-np.ones(G))
    base += G
    fast_scale = max(max(fast_cap), 1)
    slow_scale = max(max(slow_cap), 1)
    block(rank_ix, fast_b / fast_scale, base, [-np.inf] * G, [c / fast_scale for c in fast_cap], G)
    base += G
    block(rank_ix, slow_b / slow_scale, base, [-np.inf] * G, [c / slow_scale for c in slow_cap], G)
    base += G
    matrix = coo_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(base, n + 1)
    ).tocsr()
    objective = np.concatenate([_TIE_BREAK * cost, [1.0]])
    integrality = np.concatenate([np.ones(n), [0]])
    bounds = Bounds(np.zeros(n + 1), np.concatenate([np.ones(n), [np.inf]]))
    result = milp(
        objective,
        constraints=LinearConstraint(matrix, np.array(lower), np.array(upper)),
        integrality=integrality,
        bounds=bounds,
        options={"time_limit": float(time_limit_s), "mip_rel_gap": 1e-6, "disp": False},
    )
    if bound is not None and getattr(result, "mip_dual_bound", None) is not None and np.isfinite(result.mip_dual_bound):
        bound.append(max(0.0, float(result.mip_dual_bound)) * scale / (1.0 + _TIE_BREAK * world_size))
    if result.x is None:
        return None, f"no solution ({result.message})"
    x = result.x[:n] > 0.5
    choice = {}
    for i in np.flatnonzero(x):
        choice[demands[table_ix[i]].name] = (int(rank_ix[i]), int(cols_hot[i]))
    if len(choice) != T:
        return None, f"incomplete solution ({result.message})"
    gap = getattr(result, "mip_gap", None)
    status = "optimal" if result.status == 0 else f"time limit, best found (gap {gap:.2%})" if gap is not None else result.message
    return choice, status


def _cheapest_on_one_rank(d: TableDemand, grid: int, fast: str, slow: str, fast_bytes: int, slow_bytes: int) -> float:
    """The table's lowest cost on a rank of these budgets (alone on it): no
    plan's slowest rank costs less."""
    costs = [d.cost(hot, fast, slow) for hot in _candidates(d, grid)
             if hot * d.row_bytes <= fast_bytes and (d.num_rows - hot) * d.row_bytes <= slow_bytes]  # fmt: skip
    return min(costs, default=0.0)


def _solve_decomposed(demands, world_size, fast, slow, fast_cap, slow_cap, grid, time_limit_s, bound=None):
    """The joint MILP in three parts, with a lower bound on its optimum:

    1. **Pooled:** one MILP over a single rank holding every rank's fast
       and slow bytes picks each table's hot rows. It relaxes the per-rank
       budgets, so its optimal total cost over ``world_size`` bounds the
       slowest rank's cost of any plan from below (so does the cheapest
       single table).
    2. **Assignment:** tables to ranks, largest pooled cost first, each to
       the least loaded rank where its pooled hot and cold bytes fit (else
       where its bytes fit at all).
    3. **Per rank:** one MILP per rank re-picks its tables' hot rows under
       that rank's own budgets.
    4. **Rebalance:** while time is left, a table moves from the costliest
       rank to the cheapest (the one whose cost is nearest half their
       difference, of three tried) when the two ranks' MILPs then give a
       lower maximum.

    The status gives the plan's distance from the bound; ``bound`` (a
    list) receives the bound (seconds)."""
    started = time.perf_counter()
    pooled_bound: List[float] = []
    pooled, pooled_status = _solve_milp(demands, 1, fast, slow, [sum(fast_cap)], [sum(slow_cap)], grid,
                                        time_limit_s / 2, bound=pooled_bound)  # fmt: skip
    if pooled is None:
        return None, f"pooled MILP: {pooled_status}"
    lower = pooled_bound[0] / world_size if pooled_bound else 0.0
    cheapest = max((_cheapest_on_one_rank(d, grid, fast, slow, max(fast_cap), max(slow_cap)) for d in demands),
                   default=0.0)  # fmt: skip
    lower = max(lower, cheapest)
    # 2. Assignment (longest processing time first, on the pooled costs).
    load = [0.0] * world_size
    fast_left, slow_left = list(fast_cap), list(slow_cap)
    rank_of: Dict[str, int] = {}
    for d in sorted(demands, key=lambda d: (-d.cost(pooled[d.name][1], fast, slow), d.name)):
        hot = pooled[d.name][1]
        hot_b, cold_b = hot * d.row_bytes, (d.num_rows - hot) * d.row_bytes
        fitting = [g for g in range(world_size) if hot_b <= fast_left[g] and cold_b <= slow_left[g]]
        fitting = fitting or [g for g in range(world_size) if hot_b + cold_b <= fast_left[g] + slow_left[g]]
        if not fitting:
            return None, "decomposed: the pooled choice does not fit any rank"
        g = min(fitting, key=lambda r: (load[r], r))
        rank_of[d.name] = g
        load[g] += d.cost(hot, fast, slow)
        taken_fast = min(hot_b, fast_left[g])
        fast_left[g] -= taken_fast
        slow_left[g] -= hot_b + cold_b - taken_fast
    # 3. Hot rows per rank under its own budgets.
    deadline = started + time_limit_s

    def solve_rank(g, names):
        mine = [d for d in demands if d.name in names]
        if not mine:
            return {}, 0.0
        left = max(0.5, deadline - time.perf_counter()) / 4
        solved, _ = _solve_milp(mine, 1, fast, slow, [fast_cap[g]], [slow_cap[g]], grid, left)
        if solved is None:
            solved = _fill_fast(mine, {d.name: 0 for d in mine}, 1, fast, slow, [fast_cap[g]], [slow_cap[g]])
        if solved is None:
            return None, math.inf
        return solved, sum(d.cost(solved[d.name][1], fast, slow) for d in mine)

    members = [{name for name, g in rank_of.items() if g == r} for r in range(world_size)]
    per_rank = [solve_rank(g, members[g]) for g in range(world_size)]
    if any(solved is None for solved, _ in per_rank):
        return None, "decomposed: a rank's tables do not fit its budgets"
    # 4. Rebalance: a table moves from the costliest rank to the cheapest while that lowers the pair's maximum.
    by_name = {d.name: d for d in demands}
    while time.perf_counter() < deadline:
        costs = [c for _, c in per_rank]
        hi, lo = max(range(world_size), key=costs.__getitem__), min(range(world_size), key=costs.__getitem__)
        half = (costs[hi] - costs[lo]) / 2
        if half <= 1e-9 * costs[hi]:
            break
        tried = sorted(members[hi], key=lambda n: abs(by_name[n].cost(per_rank[hi][0][n][1], fast, slow) - half))[:3]
        for name in tried:
            moved_hi, moved_lo = members[hi] - {name}, members[lo] | {name}
            new_hi, new_lo = solve_rank(hi, moved_hi), solve_rank(lo, moved_lo)
            if new_hi[0] is not None and new_lo[0] is not None and max(new_hi[1], new_lo[1]) < costs[hi] * (1 - 1e-9):
                members[hi], members[lo], per_rank[hi], per_rank[lo] = moved_hi, moved_lo, new_hi, new_lo
                break
        else:
            break
    choice: Dict[str, tuple] = {}
    for g, (solved, _) in enumerate(per_rank):
        choice.update({name: (g, hot) for name, (_, hot) in solved.items()})
    worst = _max_cost(choice, demands, world_size, fast, slow)
    gap = (worst - lower) / worst if worst > 0 else 0.0
    if bound is not None:
        bound.append(lower)
    return choice, f"decomposed, within {gap:.2%} of the lower bound"


# -- the greedy plan ---------------------------------------------------------------


def _greedy_choice(demands, world_size, fast, slow, fast_cap, slow_cap) -> Optional[Dict[str, tuple]]:
    """Tables to ranks by longest-processing-time on their all-slow cost
    (each to the least loaded rank with room for it in its two tiers),
    then, per rank, fast memory filled with the row blocks that save the
    most per byte (``_fill_fast``)."""
    load = [0.0] * world_size
    room = [f + s for f, s in zip(fast_cap, slow_cap)]
    rank_of: Dict[str, int] = {}
    for d in sorted(demands, key=lambda d: (-d.cost(0, fast, slow), d.name)):
        size = d.num_rows * d.row_bytes
        fitting = [g for g in range(world_size) if size <= room[g]]
        if not fitting:
            return None
        g = min(fitting, key=lambda r: (load[r], r))
        rank_of[d.name] = g
        load[g] += d.cost(0, fast, slow)
        room[g] -= size
    return _fill_fast(demands, rank_of, world_size, fast, slow, fast_cap, slow_cap)


def _fill_fast(demands, rank_of, world_size, fast, slow, fast_cap, slow_cap) -> Optional[Dict[str, tuple]]:
    """Per rank, hot rows in blocks of 1/256 of a table, highest saving per
    byte first, until fast memory is full; the slow tier must then hold the
    rest."""
    blocks = 256
    choice = {}
    for g in range(world_size):
        mine = [d for d in demands if rank_of[d.name] == g]
        fast_left = fast_cap[g]
        hot = {d.name: 0 for d in mine}
        candidates = []
        for d in mine:
            edges = sorted({d.hot_rows_at(k / blocks) for k in range(blocks + 1)} | {d.used_rows})
            for a, b in zip(edges, edges[1:]):
                if b <= a or a >= d.used_rows:
                    continue
                saving = d.cost(a, fast, slow) - d.cost(b, fast, slow)
                candidates.append((saving / ((b - a) * d.row_bytes), d.name, a, b, d.row_bytes))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        for _, name, a, b, row_bytes in candidates:
            if hot[name] != a:
                continue  # an earlier block of the table did not fit: keep the rows contiguous
            need = (b - a) * row_bytes
            if need > fast_left:
                continue
            fast_left -= need
            hot[name] = b
        # The slow tier must hold the rest; where it cannot, more rows go fast (the next hottest of each table).
        slow_used = sum((d.num_rows - hot[d.name]) * d.row_bytes for d in mine)
        for d in sorted(mine, key=lambda d: d.name):
            if slow_used <= slow_cap[g]:
                break
            extra_rows = min(d.num_rows - hot[d.name], math.ceil((slow_used - slow_cap[g]) / d.row_bytes))
            extra_rows = min(extra_rows, fast_left // d.row_bytes)
            hot[d.name] += extra_rows
            fast_left -= extra_rows * d.row_bytes
            slow_used -= extra_rows * d.row_bytes
        if slow_used > slow_cap[g]:
            return None
        for d in mine:
            choice[d.name] = (g, hot[d.name])
    return choice


def _trim_unread_hot_rows(choice, demands, world_size, slow_cap) -> Dict[str, tuple]:
    """Hot rows past a table's last row ever read cost fast memory and save
    nothing: they go back to the slow tier while it has room (the solver
    sees no difference between the two, the budget does)."""
    slow_used = [0] * world_size
    for d in demands:
        g, hot = choice[d.name]
        slow_used[g] += (d.num_rows - hot) * d.row_bytes
    trimmed = dict(choice)
    for d in sorted(demands, key=lambda d: d.name):
        g, hot = trimmed[d.name]
        if hot <= d.used_rows:
            continue
        rows = min(hot - d.used_rows, (slow_cap[g] - slow_used[g]) // d.row_bytes)
        if rows > 0:
            trimmed[d.name] = (g, hot - rows)
            slow_used[g] += rows * d.row_bytes
    return trimmed


# -- results and errors ------------------------------------------------------------


def _rank_costs(choice, demands, world_size, fast, slow) -> List[float]:
    costs = [0.0] * world_size
    for d in demands:
        g, hot = choice[d.name]
        costs[g] += d.cost(hot, fast, slow)
    return costs


def _max_cost(choice, demands, world_size, fast, slow) -> float:
    return math.inf if choice is None else max(_rank_costs(choice, demands, world_size, fast, slow))


def _result(choice, demands, world_size, fast, slow, method, status, solve_s) -> RecShardResult:
    fast_loc, slow_loc = EmbeddingLocation(fast), EmbeddingLocation(slow)
    tables = {}
    for d in demands:
        g, hot = choice[d.name]
        shard = Shard(g, 0, d.num_rows, 0, d.embedding_dim, fast_loc, hot_rows=hot,
                      cold_location=slow_loc if hot < d.num_rows else None)  # fmt: skip
        tables[d.name] = TableSharding(d.name, ShardingType.TABLE_WISE, d.num_rows, d.embedding_dim, [shard])
    plan = ShardingPlan(world_size, tables)
    plan.validate()
    slow_reads = sum(d.reads_per_batch * (1.0 - float(d.cdf[choice[d.name][1]])) for d in demands)
    return RecShardResult(
        plan=plan,
        method=method,
        hot_rows={d.name: choice[d.name][1] for d in demands},
        rank_of={d.name: choice[d.name][0] for d in demands},
        rank_cost_s=_rank_costs(choice, demands, world_size, fast, slow),
        slow_reads_per_batch=slow_reads,
        solve_s=solve_s,
        status=status,
    )


def _check_fits(demands, fast, slow, fast_cap, slow_cap) -> None:
    total = sum(d.num_rows * d.row_bytes for d in demands)
    room = sum(fast_cap) + sum(slow_cap)
    biggest = max(demands, key=lambda d: d.num_rows * d.row_bytes, default=None)
    rank_room = max((f + s for f, s in zip(fast_cap, slow_cap)), default=0)
    if total > room or (biggest is not None and biggest.num_rows * biggest.row_bytes > rank_room):
        raise PlanningError(_not_fit_message(demands, fast, slow, fast_cap, slow_cap), [d.name for d in demands])


def _not_fit_message(demands, fast, slow, fast_cap, slow_cap) -> str:
    total = sum(d.num_rows * d.row_bytes for d in demands)
    largest = sorted(demands, key=lambda d: (-d.num_rows * d.row_bytes, d.name))[:5]
    tables = ", ".join(f"{d.name} needs {format_bytes(d.num_rows * d.row_bytes)}" for d in largest)
    ranks = ", ".join(
        f"rank {g}: {format_bytes(f)} {fast} + {format_bytes(s)} {slow}" for g, (f, s) in enumerate(zip(fast_cap, slow_cap))
    )
    return (
        f"Cannot place {len(demands)} tables ({format_bytes(total)} with their optimizer state) in the tiers of "
        f"{len(fast_cap)} ranks ({ranks}); largest tables: {tables}. Give the ranks a larger {slow} budget or add ranks."
    )
