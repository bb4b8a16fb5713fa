"""Greedy sharding planner: balances expected lookups under memory budgets.

Policy, in order (costs and bytes as in ``dist_rec.planner.cost``):

1. **Data-parallel** first, since it takes memory on every rank: tables
   whose only permitted type is ``data_parallel``, and tables that permit it
   and are at most ``data_parallel_max_bytes`` (table + optimizer state).
2. **Tables too big for one rank** (or that do not permit ``table_wise``),
   largest first: ``table_row_wise`` over the ranks of one host when there
   are several hosts and it fits (the host with the least lookup cost so
   far), else ``row_wise`` over all ranks, else ``column_wise`` over the
   fewest ranks whose column blocks fit.
3. **The rest, table-wise**, largest lookup cost first, each on the rank
   with the least lookup cost so far among those with memory for it (ties:
   the rank with the smaller share of its budget used, then the lower rank).
   A table that fits no single rank any more falls back as in step 2.

``column_wise`` is only used where permitted explicitly (``allowed_types``
or ``table_constraints``). If some table fits nowhere, the table-wise step
is tried once more in first-fit-decreasing order of bytes (better packing
when memory, not lookups, is what binds); if that fails too,
``PlanningError`` says what each rank has and what the tables need.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from dist_rec.modules.embedding_configs import EmbeddingBagConfig
from dist_rec.planner.cost import (
    DEFAULT_BATCH_SIZE_PER_RANK,
    as_configs,
    check_batch_inputs,
    format_bytes,
    num_state_values,
    rank_loads,
    shard_bytes,
    table_bytes,
    table_costs,
)
from dist_rec.planner.topology import Topology
from dist_rec.planner.plan import ShardingPlan, ShardingType, TableSharding, even_splits, table_sharding

DEFAULT_ALLOWED_TYPES = (ShardingType.DATA_PARALLEL, ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE)

# Tables up to this size (weights + optimizer state) are replicated when
# data_parallel is permitted: 1 MiB is e.g. 4096 rows x 64 fp32 columns.
DEFAULT_DATA_PARALLEL_MAX_BYTES = 1 << 20

SHORT_NAMES = {
    ShardingType.DATA_PARALLEL: "dp",
    ShardingType.TABLE_WISE: "tw",
    ShardingType.ROW_WISE: "rw",
    ShardingType.COLUMN_WISE: "cw",
    ShardingType.TABLE_ROW_WISE: "twrw",
}

# The order in which sharded types are tried for one table.
_FALLBACK_ORDER = (ShardingType.TABLE_WISE, ShardingType.TABLE_ROW_WISE, ShardingType.ROW_WISE, ShardingType.COLUMN_WISE)


class PlanningError(ValueError):
    """The tables do not fit the ranks' memory under the permitted sharding
    types. ``unplaced`` names the tables that found no place."""

    def __init__(self, message: str, unplaced: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.unplaced = list(unplaced)


class _Ranks:
    """Bytes used, lookup cost and tables placed on each rank so far."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.budget = list(topology.budgets)
        self.used = [0] * topology.world_size
        self.cost = [0.0] * topology.world_size
        self.labels: List[List[str]] = [[] for _ in range(topology.world_size)]

    def free(self, rank: int) -> int:
        return self.budget[rank] - self.used[rank]

    def fits(self, loads: Sequence[Tuple[int, int, float]]) -> bool:
        need: Dict[int, int] = {}
        for rank, nbytes, _ in loads:
            need[rank] = need.get(rank, 0) + nbytes
        return all(n <= self.free(r) for r, n in need.items())

    def add(self, sharding: TableSharding, loads: Sequence[Tuple[int, int, float]]) -> None:
        label = sharding.table
        if sharding.sharding_type != ShardingType.TABLE_WISE:
            label += f" ({SHORT_NAMES[sharding.sharding_type]})"
        for rank, nbytes, cost in loads:
            self.used[rank] += nbytes
            self.cost[rank] += cost
            self.labels[rank].append(label)

    def least_loaded(self, ranks: Sequence[int]) -> List[int]:
        return sorted(ranks, key=lambda r: (self.cost[r], self.used[r] / self.budget[r], r))


def _check_types(name: str, types: Union[str, Sequence[str]]) -> List[ShardingType]:
    listed = [types] if isinstance(types, str) else list(types)
    known = ShardingType.str_values()
    bad = [t for t in listed if t not in known]
    if bad or not listed:
        raise ValueError(f"Invalid {name}={types!r}. Must be a non-empty list of {', '.join(known)}.")
    return [ShardingType(t) for t in listed]


class _GreedyPass:
    """One greedy placement of all tables; ``unplaced`` lists what failed."""

    def __init__(self, configs, topology, optimizer, costs, permitted, data_parallel_max_bytes, table_order) -> None:
        self.topology = topology
        self.optimizer = optimizer
        self.costs = costs
        self.permitted = permitted
        self.ranks = _Ranks(topology)
        self.placed: Dict[str, TableSharding] = {}
        self.unplaced: List[EmbeddingBagConfig] = []

        rest = []
        for c in configs:
            types = permitted[c.name]
            only_dp = set(types) == {ShardingType.DATA_PARALLEL}
            wants_dp = only_dp or (ShardingType.DATA_PARALLEL in types and table_bytes(c, optimizer) <= data_parallel_max_bytes)
            if wants_dp and self._commit(c, ShardingType.DATA_PARALLEL):
                continue
            if only_dp:
                self.unplaced.append(c)
            else:
                rest.append(c)

        # Tables that cannot be table-wise go before the table-wise ones:
        # they take memory on many ranks at once and have fewer choices.
        largest_free = max(self.ranks.free(r) for r in range(topology.world_size))
        wide = [c for c in rest if ShardingType.TABLE_WISE not in permitted[c.name] or table_bytes(c, optimizer) > largest_free]
        wide_names = {c.name for c in wide}
        narrow = [c for c in rest if c.name not in wide_names]
        wide.sort(key=lambda c: (-table_bytes(c, optimizer), c.name))
        if table_order == "cost":
            narrow.sort(key=lambda c: (-costs[c.name], -table_bytes(c, optimizer), c.name))
        else:
            narrow.sort(key=lambda c: (-table_bytes(c, optimizer), -costs[c.name], c.name))
        for c in wide + narrow:
            if not any(self._commit(c, t) for t in self._sharded_types(c)):
                self.unplaced.append(c)

    def _sharded_types(self, config: EmbeddingBagConfig) -> List[str]:
        types = self.permitted[config.name]
        order = [t for t in _FALLBACK_ORDER if t in types]
        # On one host, table-row-wise is row-wise under another name.
        if self.topology.num_hosts == 1 and ShardingType.ROW_WISE in order and ShardingType.TABLE_ROW_WISE in order:
            order.remove(ShardingType.TABLE_ROW_WISE)
        return order

    def _commit(self, config: EmbeddingBagConfig, sharding_type: ShardingType) -> bool:
        for sharding in self._candidates(config, sharding_type):
            loads = rank_loads(sharding, config, self.costs[config.name], self.topology.world_size, self.optimizer)
            if self.ranks.fits(loads):
                self.ranks.add(sharding, loads)
                self.placed[config.name] = sharding
                return True
        return False

    def _candidates(self, config: EmbeddingBagConfig, sharding_type: ShardingType):
        """Shardings of ``config`` of one type, best first."""
        name, rows, dim = config.name, config.num_embeddings, config.embedding_dim
        world = range(self.topology.world_size)
        if sharding_type in (ShardingType.DATA_PARALLEL, ShardingType.ROW_WISE):
            yield table_sharding(name, rows, dim, sharding_type, list(world))
        elif sharding_type == ShardingType.TABLE_WISE:
            need = table_bytes(config, self.optimizer)
            for rank in self.ranks.least_loaded([r for r in world if self.ranks.free(r) >= need])[:1]:
                yield table_sharding(name, rows, dim, ShardingType.TABLE_WISE, [rank])
        elif sharding_type == ShardingType.TABLE_ROW_WISE:
            cost = self.ranks.cost
            for host in sorted(
                self.topology.hosts(), key=lambda h: (sum(cost[r] for r in h), max(cost[r] for r in h), h[0])
            ):
                yield table_sharding(name, rows, dim, ShardingType.TABLE_ROW_WISE, host)
        elif sharding_type == ShardingType.COLUMN_WISE:
            # The fewest column blocks (at least 2 where there are 2 ranks)
            # that fit, on the least-loaded ranks with room.
            for k in range(min(2, len(world)), min(len(world), dim) + 1):
                need = shard_bytes(config, rows, even_splits(dim, k)[0][1], self.optimizer)
                ranks = self.ranks.least_loaded([r for r in world if self.ranks.free(r) >= need])[:k]
                if len(ranks) == k:
                    yield table_sharding(name, rows, dim, ShardingType.COLUMN_WISE, ranks)
                    return


def plan_sharding(
    tables: Sequence,
    topology: Topology,
    optimizer=None,
    expected_ids_per_batch: Optional[Mapping[str, float]] = None,
    batch_size_per_rank: int = DEFAULT_BATCH_SIZE_PER_RANK,
    allowed_types: Optional[Sequence[str]] = None,
    table_constraints: Optional[Mapping[str, Union[str, Sequence[str]]]] = None,
    data_parallel_max_bytes: int = DEFAULT_DATA_PARALLEL_MAX_BYTES,
) -> ShardingPlan:
    """A plan for ``tables`` over the ranks of ``topology`` (see the module
    docstring for the policy).

    Args:
        tables (Sequence[EmbeddingBagConfig]): the tables, ours or TorchRec's.
        topology (Topology): ranks and their memory budgets.
        optimizer (Optional[FusedOptimizer]): the fused optimizer; each of its
            ``state_names`` costs 4 bytes per row. (Default: None, no state)
        expected_ids_per_batch (Optional[Dict[str, float]]): expected ids of a
            feature in one rank's batch (all its bags together). Features
            not named count one id per sample. (Default: None)
        batch_size_per_rank (int): samples per rank per step. (Default: 512)
        allowed_types (Optional[Sequence[str]]): sharding types the planner
            may use. (Default: all but column_wise)
        table_constraints (Optional[Dict[str, str or Sequence[str]]]): per
            table, the sharding type (or types) it must use; overrides
            ``allowed_types`` for that table.
        data_parallel_max_bytes (int): tables up to this size (with optimizer
            state) are replicated where data_parallel is permitted.
            (Default: 1 MiB)

    Returns:
        A validated ``ShardingPlan`` over ranks 0 .. world_size - 1, tables in
        the order given.

    Raises:
        PlanningError: some table fits on no rank (the message lists each
            rank's budget and use, and what the largest unplaced tables need).
        ValueError: invalid arguments.

    Example::

        topology = Topology(world_size=4, memory_per_rank_bytes=8 << 30)
        plan = plan_sharding(tables, topology, optimizer=RowWiseAdagrad(lr=0.02))
        print(plan_summary(plan, tables, optimizer=RowWiseAdagrad(lr=0.02), topology=topology))
    """
    if not isinstance(topology, Topology):
        raise TypeError(f"Invalid topology={topology!r}. Must be a Topology.")
    configs = as_configs(tables)
    check_batch_inputs(configs, expected_ids_per_batch, batch_size_per_rank)
    if (
        isinstance(data_parallel_max_bytes, bool)
        or not isinstance(data_parallel_max_bytes, int)
        or data_parallel_max_bytes < 0
    ):
        raise ValueError(f"Invalid data_parallel_max_bytes={data_parallel_max_bytes!r}. Must be an int >= 0.")
    allowed = _check_types("allowed_types", DEFAULT_ALLOWED_TYPES if allowed_types is None else allowed_types)
    constraints = dict(table_constraints or {})
    unknown = sorted(set(constraints) - {c.name for c in configs})
    if unknown:
        raise ValueError(f"Invalid table_constraints: tables {unknown} are not among the tables planned.")
    permitted = {
        c.name: _check_types(f"table_constraints[{c.name!r}]", constraints[c.name])
        if c.name in constraints
        else allowed
        for c in configs
    }
    costs = table_costs(configs, expected_ids_per_batch, batch_size_per_rank)

    best = None
    for order in ("cost", "bytes"):
        attempt = _GreedyPass(configs, topology, optimizer, costs, permitted, data_parallel_max_bytes, order)
        if not attempt.unplaced:
            plan = ShardingPlan(topology.world_size, {c.name: attempt.placed[c.name] for c in configs})
            plan.validate([c.name for c in configs])
            return plan
        if best is None or len(attempt.unplaced) < len(best.unplaced):
            best = attempt
    message = _not_fit_message(best, len(configs), optimizer, data_parallel_max_bytes)
    raise PlanningError(message, [c.name for c in best.unplaced])


def table_wise_plan(
    tables: Sequence,
    world_size: int,
    optimizer=None,
    memory_per_rank_bytes: Optional[int] = None,
    local_world_size: Optional[int] = None,
) -> ShardingPlan:
    """Every table whole on one rank, placed as the greedy planner places
    table-wise tables: largest expected lookups first (then largest bytes),
    each on the rank with the fewest so far, ties to the smaller share of
    its budget used. This is what
    ``DistributedModelParallel(sharding_type="table_wise")`` shards by.
    Without ``expected_ids_per_batch`` every table of one width costs the
    same, so the tables are dealt out largest first by count and then by
    memory. Round-robin by table order can pile the large tables on one rank:
    with the multihot benchmark's 26 tables (bench_sharded.py) on 2 ranks
    it put 2.0M rows on rank 1 against 1.0M, and the ranks' embedding work
    took 24.2 against 19.9 ms a step, one rank waiting for the other at
    every all-to-all; placed here, 1.45M and 1.61M rows, 22.3 and 22.0 ms.

    ``memory_per_rank_bytes`` bounds each rank (default: no bound);
    ``PlanningError`` when the tables do not fit."""
    configs = as_configs(tables)
    if memory_per_rank_bytes is None:
        memory_per_rank_bytes = max(1, sum(table_bytes(c, optimizer) for c in configs))
    topology = Topology(
        world_size=world_size, memory_per_rank_bytes=memory_per_rank_bytes, local_world_size=local_world_size
    )
    return plan_sharding(
        configs, topology, optimizer=optimizer, allowed_types=[ShardingType.TABLE_WISE.value], data_parallel_max_bytes=0
    )


# -- the error ------------------------------------------------------------------

_MAX_RANKS_LISTED = 8
_MAX_TABLES_LISTED = 5
_MAX_LABELS_LISTED = 4


def _needs(
    config: EmbeddingBagConfig, types: Sequence[ShardingType], topology: Topology, optimizer, data_parallel_max_bytes: int
) -> str:
    """What ``config`` needs per rank under each type the planner tried."""
    full = table_bytes(config, optimizer)
    world, host = topology.world_size, topology.local_world_size
    rows, dim = config.num_embeddings, config.embedding_dim
    tried = list(types)
    if ShardingType.DATA_PARALLEL in tried and set(tried) != {ShardingType.DATA_PARALLEL} and full > data_parallel_max_bytes:
        tried.remove(ShardingType.DATA_PARALLEL)
    if topology.num_hosts == 1 and ShardingType.ROW_WISE in tried and ShardingType.TABLE_ROW_WISE in tried:
        tried.remove(ShardingType.TABLE_ROW_WISE)
    parts = []
    for t in tried:
        if t == ShardingType.DATA_PARALLEL:
            parts.append(f"data_parallel: {format_bytes(full)} on every rank")
        elif t == ShardingType.TABLE_WISE:
            parts.append(f"table_wise: {format_bytes(full)} on one rank")
        elif t == ShardingType.ROW_WISE:
            per_rank = shard_bytes(config, even_splits(rows, world)[0][1], dim, optimizer)
            parts.append(f"row_wise over {world} ranks: {format_bytes(per_rank)} per rank")
        elif t == ShardingType.TABLE_ROW_WISE:
            per_rank = shard_bytes(config, even_splits(rows, host)[0][1], dim, optimizer)
            parts.append(f"table_row_wise over the {host} ranks of a host: {format_bytes(per_rank)} per rank")
        elif t == ShardingType.COLUMN_WISE:
            k = min(world, dim)
            per_rank = shard_bytes(config, rows, even_splits(dim, k)[0][1], optimizer)
            parts.append(f"column_wise over {k} ranks: {format_bytes(per_rank)} per rank")
    return "; ".join(parts)


def _not_fit_message(attempt: _GreedyPass, num_tables: int, optimizer, data_parallel_max_bytes: int) -> str:
    topology, ranks = attempt.topology, attempt.ranks
    world = topology.world_size

    def describe(r: int) -> str:
        labels = ranks.labels[r]
        shown = ", ".join(labels[:_MAX_LABELS_LISTED])
        if len(labels) > _MAX_LABELS_LISTED:
            shown += f", +{len(labels) - _MAX_LABELS_LISTED} more"
        holds = f": {shown}" if labels else ""
        return f"rank {r} budget {format_bytes(ranks.budget[r])} (used {format_bytes(ranks.used[r])}{holds})"

    rank_text = ", ".join(describe(r) for r in range(min(world, _MAX_RANKS_LISTED)))
    if world > _MAX_RANKS_LISTED:
        others = range(_MAX_RANKS_LISTED, world)
        rank_text += (
            f", and {len(others)} more ranks with {format_bytes(min(ranks.free(r) for r in others))}"
            f" to {format_bytes(max(ranks.free(r) for r in others))} free"
        )

    unplaced = sorted(attempt.unplaced, key=lambda c: (-table_bytes(c, optimizer), c.name))
    needs = [
        (c, _needs(c, attempt.permitted[c.name], topology, optimizer, data_parallel_max_bytes))
        for c in unplaced[:_MAX_TABLES_LISTED]
    ]
    table_text = ", ".join(
        f"{c.name} needs {format_bytes(table_bytes(c, optimizer))} ({per_type})" for c, per_type in needs
    )
    if len(unplaced) > _MAX_TABLES_LISTED:
        table_text += f", and {len(unplaced) - _MAX_TABLES_LISTED} more"

    states = num_state_values(optimizer)
    state_text = f" (with {states} float32 optimizer state{'s' if states > 1 else ''} per row)" if states else ""
    hint = "Give the ranks more memory or add ranks"
    if any(ShardingType.ROW_WISE not in attempt.permitted[c.name] for c in unplaced):
        hint += ", or permit row_wise (or column_wise) sharding for these tables"
    return (
        f"Cannot fit {len(unplaced)} of {num_tables} tables on {world} ranks{state_text}: {rank_text}; "
        f"largest tables not placed: {table_text}. {hint}."
    )
