"""The greedy planner: valid, balanced plans within memory budgets, and a
readable error when the tables do not fit. No processes: planning is pure."""

import random
import re
from types import SimpleNamespace

import pytest

from dist_rec.modules.embedding_configs import DataType, EmbeddingBagConfig
from dist_rec.optim.fused import SGD, RowWiseAdagrad
from dist_rec.planner import (
    PlanningError,
    Topology,
    lookup_cost,
    plan_sharding,
    plan_summary,
    rank_stats,
    table_bytes,
    table_wise_plan,
)
from dist_rec.planner.plan import ShardingPlan, uniform_plan

MiB = 1 << 20


def table(name, rows, dim=16, features=None, **kw):
    return EmbeddingBagConfig(
        num_embeddings=rows, embedding_dim=dim, name=name, feature_names=features or [f"{name}_f"], **kw
    )


def types_of(plan):
    return {name: t.sharding_type for name, t in plan.tables.items()}


def max_rank_cost(plan, tables, **kw):
    return max(s.lookup_cost for s in rank_stats(plan, tables, **kw))


# -- cost model -------------------------------------------------------------------


def test_table_bytes_counts_weights_dtype_and_optimizer_state():
    t = table("t", 1000, dim=32)
    assert table_bytes(t) == 1000 * 32 * 4
    assert table_bytes(t, SGD()) == 1000 * 32 * 4  # SGD keeps no state
    assert table_bytes(t, RowWiseAdagrad()) == 1000 * (32 * 4 + 4)
    half = table("h", 1000, dim=32, data_type=DataType.FP16)
    assert table_bytes(half, RowWiseAdagrad()) == 1000 * (32 * 2 + 4)


def test_lookup_cost_is_ids_times_dim_summed_over_features():
    t = table("t", 100, dim=8, features=["a", "b"])
    assert lookup_cost(t, batch_size_per_rank=10) == (10 + 10) * 8  # one id per sample by default
    assert lookup_cost(t, {"a": 50.0}, batch_size_per_rank=10) == (50 + 10) * 8


# -- plans ------------------------------------------------------------------------


def test_plan_validates_covers_every_table_in_order():
    tables = [table(f"t{i}", rows) for i, rows in enumerate([10, 50_000, 200_000, 7, 80_000])]
    plan = plan_sharding(tables, Topology(world_size=3, memory_per_rank_bytes=64 * MiB), optimizer=RowWiseAdagrad())
    plan.validate([t.name for t in tables])
    assert list(plan.tables) == [t.name for t in tables]
    assert plan.world_size == 3
    # the two tiny tables are replicated, the rest fit one rank each
    assert types_of(plan) == {
        "t0": "data_parallel",
        "t1": "table_wise",
        "t2": "table_wise",
        "t3": "data_parallel",
        "t4": "table_wise",
    }


def test_empty_table_list_gives_an_empty_plan():
    plan = plan_sharding([], Topology(2, MiB))
    assert plan.tables == {} and plan.world_size == 2


def test_eight_equal_tables_on_four_ranks_two_each():
    tables = [table(f"t{i}", 100_000) for i in range(8)]
    plan = plan_sharding(tables, Topology(4, 64 * MiB))
    per_rank = [0] * 4
    for t in plan.tables.values():
        assert t.sharding_type == "table_wise"
        per_rank[t.shards[0].rank] += 1
    assert per_rank == [2, 2, 2, 2]


@pytest.mark.parametrize("seed", range(5))
def test_cost_weighted_balance_within_greedy_bound(seed):
    rng = random.Random(seed)
    tables = [table(f"t{i}", rng.randint(20_000, 100_000), dim=rng.choice([8, 16, 32, 64])) for i in range(23)]
    ids = {t.feature_names[0]: rng.uniform(1.0, 5000.0) for t in tables}
    world = 4
    plan = plan_sharding(tables, Topology(world, 1 << 30), expected_ids_per_batch=ids, allowed_types=["table_wise"])
    costs = [lookup_cost(t, ids) * world for t in tables]  # a table-wise table serves every rank's batch
    optimum_at_least = max(sum(costs) / world, max(costs))
    # Largest-first greedy (LPT) is within 4/3 - 1/(3 m) of the optimum.
    assert (
        max_rank_cost(plan, tables, expected_ids_per_batch=ids) <= (4 / 3 - 1 / (3 * world)) * optimum_at_least + 1e-6
    )


def test_hot_table_gets_a_rank_to_itself():
    tables = [table(f"t{i}", 50_000) for i in range(5)]
    ids = {"t2_f": 4 * 512.0}  # as hot as the four others together
    plan = plan_sharding(tables, Topology(2, 64 * MiB), expected_ids_per_batch=ids)
    hot_rank = plan.tables["t2"].shards[0].rank
    assert all(plan.tables[f"t{i}"].shards[0].rank != hot_rank for i in (0, 1, 3, 4))


def test_memory_budgets_respected():
    rng = random.Random(7)
    tables = [table(f"t{i}", rng.randint(5_000, 60_000), dim=32) for i in range(30)]
    optimizer = RowWiseAdagrad()
    total = sum(table_bytes(t, optimizer) for t in tables)
    budgets = [int(total * share) for share in (0.20, 0.30, 0.25, 0.35)]
    topology = Topology(4, budgets)
    plan = plan_sharding(tables, topology, optimizer=optimizer, allowed_types=["table_wise"])
    for s in rank_stats(plan, tables, optimizer=optimizer, topology=topology):
        assert s.memory_bytes <= s.budget_bytes == budgets[s.rank]


def test_memory_bound_packing_falls_back_to_size_order():
    # By cost the hot small table goes first, to rank 0 (a tie broken by
    # rank), and leaves no rank with room for the big one; first-fit-
    # decreasing by bytes finds the plan.
    tables = [table("big", 80_000), table("hot", 40_000)]
    unit = table_bytes(table("u", 20_000))
    topology = Topology(2, [4 * unit, 2 * unit])
    plan = plan_sharding(tables, topology, expected_ids_per_batch={"hot_f": 10_000.0}, allowed_types=["table_wise"])
    assert plan.tables["big"].shards[0].rank == 0 and plan.tables["hot"].shards[0].rank == 1


def test_bigger_rank_takes_the_bigger_table():
    tables = [table("huge", 400_000), table("small", 100_000)]
    plan = plan_sharding(tables, Topology(2, [8 * MiB, 32 * MiB]), allowed_types=["table_wise"])
    assert plan.tables["huge"].shards[0].rank == 1
    assert plan.tables["small"].shards[0].rank == 0


def test_table_too_big_for_one_rank_goes_row_wise():
    tables = [table("big", 1_000_000), table("t1", 50_000), table("t2", 50_000)]
    topology = Topology(4, 24 * MiB)  # big is 64.8 MiB with its state, 16.2 MiB per rank row-wise
    plan = plan_sharding(tables, topology, optimizer=RowWiseAdagrad())
    big = plan.tables["big"]
    assert big.sharding_type == "row_wise" and big.ranks == [0, 1, 2, 3]
    assert plan.tables["t1"].sharding_type == "table_wise"
    for s in rank_stats(plan, tables, optimizer=RowWiseAdagrad(), topology=topology):
        assert s.memory_bytes <= s.budget_bytes


def test_table_too_big_for_one_rank_goes_table_row_wise_on_a_host_when_it_fits():
    tables = [table("big", 1_000_000), table("t1", 50_000), table("t2", 50_000)]
    plan = plan_sharding(tables, Topology(4, 40 * MiB, local_world_size=2))  # big: 61 MiB, 30.5 per rank of a host
    assert plan.tables["big"].sharding_type == "table_row_wise"
    assert plan.tables["big"].ranks in ([0, 1], [2, 3])
    # the small tables go to the other host, which has no lookups yet
    assert {plan.tables["t1"].shards[0].rank, plan.tables["t2"].shards[0].rank} == {0, 1, 2, 3} - set(
        plan.tables["big"].ranks
    )


def test_table_too_big_for_one_host_goes_row_wise():
    plan = plan_sharding(
        [table("bigger", 1_600_000)], Topology(4, 40 * MiB, local_world_size=2)
    )  # 48.8 MiB per rank of a host
    assert plan.tables["bigger"].sharding_type == "row_wise" and plan.tables["bigger"].ranks == [0, 1, 2, 3]


def test_two_big_tables_go_on_different_hosts():
    tables = [table("a", 1_000_000), table("b", 1_000_000)]
    plan = plan_sharding(tables, Topology(4, 40 * MiB, local_world_size=2))
    assert types_of(plan) == {"a": "table_row_wise", "b": "table_row_wise"}
    assert {tuple(plan.tables["a"].ranks), tuple(plan.tables["b"].ranks)} == {(0, 1), (2, 3)}


def test_column_wise_only_when_permitted():
    tables = [table("wide", 100_000, dim=128)]  # 48.8 MiB
    topology = Topology(4, 30 * MiB)
    assert types_of(plan_sharding(tables, topology)) == {"wide": "row_wise"}
    plan = plan_sharding(tables, topology, allowed_types=["table_wise", "column_wise"])
    wide = plan.tables["wide"]
    assert wide.sharding_type == "column_wise"
    assert len(wide.shards) == 2 and sorted(s.num_cols for s in wide.shards) == [64, 64]


def test_column_wise_uses_more_blocks_when_two_do_not_fit():
    plan = plan_sharding([table("wide", 100_000, dim=128)], Topology(4, 20 * MiB), allowed_types=["column_wise"])
    assert len(plan.tables["wide"].shards) == 3


def test_table_constraints_are_honoured():
    tables = [table(f"t{i}", 50_000) for i in range(5)] + [table("tiny", 10)]
    constraints = {
        "t0": "row_wise",
        "t1": "data_parallel",
        "t2": ["column_wise"],
        "t3": "table_row_wise",
        "tiny": "table_wise",
    }
    plan = plan_sharding(tables, Topology(4, 64 * MiB, local_world_size=2), table_constraints=constraints)
    assert types_of(plan) == {
        "t0": "row_wise",
        "t1": "data_parallel",
        "t2": "column_wise",
        "t3": "table_row_wise",
        "t4": "table_wise",
        "tiny": "table_wise",
    }
    assert plan.tables["t0"].ranks == [0, 1, 2, 3]
    assert plan.tables["t3"].ranks in ([0, 1], [2, 3])


def test_allowed_types_are_honoured():
    tables = [table("tiny", 10), table("mid", 50_000), table("big", 1_000_000)]
    plan = plan_sharding(tables, Topology(2, 40 * MiB), allowed_types=["table_wise", "row_wise"])
    assert types_of(plan) == {"tiny": "table_wise", "mid": "table_wise", "big": "row_wise"}
    plan = plan_sharding(tables, Topology(2, 80 * MiB), allowed_types=["row_wise"])
    assert set(types_of(plan).values()) == {"row_wise"}


def test_data_parallel_threshold():
    tables = [table("small", 1000), table("mid", 20_000)]  # 62.5 KiB and 1.2 MiB
    topology = Topology(2, 64 * MiB)
    assert types_of(plan_sharding(tables, topology)) == {"small": "data_parallel", "mid": "table_wise"}
    assert types_of(plan_sharding(tables, topology, data_parallel_max_bytes=0)) == {
        "small": "table_wise",
        "mid": "table_wise",
    }
    assert types_of(plan_sharding(tables, topology, data_parallel_max_bytes=2 * MiB)) == {
        "small": "data_parallel",
        "mid": "data_parallel",
    }


def test_small_table_that_cannot_be_replicated_is_placed_table_wise():
    tables = [table("small", 1000), table("fill", 14_000)]  # 62.5 KiB, 875 KiB
    plan = plan_sharding(tables, Topology(2, [MiB, 50_000]), allowed_types=["data_parallel", "table_wise"])
    assert types_of(plan) == {"small": "table_wise", "fill": "table_wise"}


# -- every table table-wise (DistributedModelParallel(sharding_type="table_wise")) --


def test_table_wise_plan_balances_tables_and_rows_where_round_robin_piles_them_up():
    rows = [20_000, 10, 20_000, 10, 300, 70]
    tables = [table(f"t{i}", n) for i, n in enumerate(rows)]
    dealt = uniform_plan(tables, "table_wise", 2)
    assert dealt.tables["t0"].ranks == dealt.tables["t2"].ranks == [0]  # both large tables on rank 0
    plan = table_wise_plan(tables, 2, optimizer=RowWiseAdagrad())
    assert set(types_of(plan).values()) == {"table_wise"} and all(len(t.ranks) == 1 for t in plan.tables.values())
    rank_of = {name: t.ranks[0] for name, t in plan.tables.items()}
    held = [sum(n for i, n in enumerate(rows) if rank_of[f"t{i}"] == r) for r in range(2)]
    assert rank_of["t0"] != rank_of["t2"] and max(held) - min(held) <= 300, (rank_of, held)
    assert sorted(rank_of.values()) == [0, 0, 0, 1, 1, 1]  # equal lookups: three tables each


def test_table_wise_plan_puts_the_busier_table_on_its_own_rank():
    # Lookups count first: a 64-wide table costs as much as four 16-wide ones.
    tables = [table("wide", 100, dim=64)] + [table(f"n{i}", 100_000) for i in range(4)]
    plan = table_wise_plan(tables, 2)
    rank_of = {name: t.ranks[0] for name, t in plan.tables.items()}
    assert [name for name, r in rank_of.items() if r == rank_of["wide"]] == ["wide"], rank_of


def test_table_wise_plan_more_ranks_than_tables_and_no_tables():
    plan = table_wise_plan([table("a", 50), table("b", 40)], 4)
    assert sorted(t.ranks[0] for t in plan.tables.values()) == [0, 1]
    assert table_wise_plan([], 3).tables == {}


def test_table_wise_plan_within_a_memory_bound_or_a_clear_error():
    tables = [table("big", 10_000), table("small", 100)]  # 625 KiB, 6.25 KiB
    plan = table_wise_plan(tables, 2, memory_per_rank_bytes=700_000)
    assert {t.ranks[0] for t in plan.tables.values()} == {0, 1}
    with pytest.raises(PlanningError, match=r"big needs 625\.0 KiB \(table_wise: 625\.0 KiB on one rank\)") as error:
        table_wise_plan(tables, 2, memory_per_rank_bytes=600_000)
    assert error.value.unplaced == ["big"]


def test_torchrec_style_configs_are_accepted():
    tr = SimpleNamespace(num_embeddings=100_000, embedding_dim=16, name="t", feature_names=["f"])
    plan = plan_sharding([tr], Topology(2, 64 * MiB))
    assert types_of(plan) == {"t": "table_wise"}


def test_planning_is_deterministic():
    rng = random.Random(3)
    tables = [table(f"t{i}", rng.randint(1000, 900_000)) for i in range(12)]
    topology = Topology(4, 100 * MiB, local_world_size=2)
    plan = plan_sharding(tables, topology)
    assert len(set(types_of(plan).values())) > 1
    assert plan.to_dict() == plan_sharding(tables, topology).to_dict()


def test_planned_plan_json_round_trip(tmp_path):
    tables = [table("big", 1_000_000), table("t1", 50_000), table("tiny", 10), table("cw", 20_000, dim=64)]
    plan = plan_sharding(
        tables,
        Topology(4, 40 * MiB, local_world_size=2),
        optimizer=RowWiseAdagrad(),
        table_constraints={"cw": "column_wise"},
    )
    assert set(types_of(plan).values()) == {"table_row_wise", "table_wise", "data_parallel", "column_wise"}
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = ShardingPlan.load(path)
    assert loaded == plan and str(loaded) == str(plan)


# -- when nothing fits -------------------------------------------------------------


def test_not_fit_error_names_ranks_budgets_use_and_largest_tables():
    tables = [table("t0", 12_000), table("t1", 12_000), table("big", 200_000), table("bigger", 300_000)]
    topology = Topology(2, MiB)
    with pytest.raises(PlanningError) as info:
        plan_sharding(tables, topology, allowed_types=["table_wise", "row_wise"])
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert sorted(info.value.unplaced) == ["big", "bigger"]
    assert message.startswith("Cannot fit 2 of 4 tables on 2 ranks: ")
    assert re.search(r"rank 0 budget 1\.0 MiB \(used 750\.0 KiB: t[01]\)", message)
    assert re.search(r"rank 1 budget 1\.0 MiB \(used 750\.0 KiB: t[01]\)", message)
    # largest first, with what each permitted type needs per rank
    assert (
        "largest tables not placed: bigger needs 18.3 MiB (table_wise: 18.3 MiB on one rank; "
        "row_wise over 2 ranks: 9.2 MiB per rank), big needs 12.2 MiB" in message
    )
    assert message.endswith("Give the ranks more memory or add ranks.")


def test_not_fit_error_mentions_optimizer_state_and_hint():
    with pytest.raises(
        PlanningError,
        match=r"on 3 ranks \(with 1 float32 optimizer state per row\): rank 0 budget 1\.0 MiB \(used 0 B\)",
    ) as info:
        plan_sharding([table("t", 100_000)], Topology(3, MiB), optimizer=RowWiseAdagrad(), allowed_types=["table_wise"])
    assert "t needs 6.5 MiB (table_wise: 6.5 MiB on one rank)" in str(info.value)
    assert "permit row_wise (or column_wise) sharding for these tables" in str(info.value)


def test_not_fit_error_for_a_forced_data_parallel_table():
    with pytest.raises(PlanningError, match=r"big needs 3\.1 MiB \(data_parallel: 3\.1 MiB on every rank\)"):
        plan_sharding([table("big", 50_000)], Topology(2, 2 * MiB), table_constraints={"big": "data_parallel"})


def test_not_fit_error_on_many_ranks_stays_short():
    with pytest.raises(PlanningError) as info:
        plan_sharding([table(f"t{i}", 600_000) for i in range(7)], Topology(16, MiB))
    message = str(info.value)
    assert "rank 7 budget" in message and "rank 8 budget" not in message
    assert "and 8 more ranks with 1.0 MiB to 1.0 MiB free" in message
    assert "and 2 more." in message  # 7 tables, 5 listed


# -- invalid arguments ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=0, memory_per_rank_bytes=1), "Invalid world_size=0. Must be an int >= 1."),
        (dict(world_size=2.0, memory_per_rank_bytes=1), "Invalid world_size=2.0. Must be an int >= 1."),
        (dict(world_size=2, memory_per_rank_bytes=0), "Invalid memory_per_rank_bytes=0. Must be an int > 0"),
        (dict(world_size=2, memory_per_rank_bytes=1.5), "Invalid memory_per_rank_bytes=1.5. Must be an int > 0"),
        (
            dict(world_size=2, memory_per_rank_bytes=[1, 2, 3]),
            "Invalid memory_per_rank_bytes=[1, 2, 3]. Must be an int > 0 or a list of world_size=2 ints > 0.",
        ),
        (dict(world_size=2, memory_per_rank_bytes=[1, -2]), "Invalid memory_per_rank_bytes=[1, -2]."),
        (
            dict(world_size=4, memory_per_rank_bytes=1, local_world_size=3),
            "Invalid local_world_size=3. Must be an int >= 1 that divides world_size=4.",
        ),
        (dict(world_size=4, memory_per_rank_bytes=1, local_world_size=0), "Invalid local_world_size=0."),
        (
            dict(world_size=4, memory_per_rank_bytes=1, compute_device="tpu"),
            "Invalid compute_device='tpu'. Must be one of cpu, cuda.",
        ),
    ],
)
def test_invalid_topology(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Topology(**kwargs)


def test_topology_normalises_budgets_and_hosts():
    topology = Topology(4, 100, local_world_size=2)
    assert topology.budgets == (100, 100, 100, 100)
    assert topology.num_hosts == 2 and topology.hosts() == [[0, 1], [2, 3]]
    assert Topology(2, [1, 2]).budgets == (1, 2)
    assert Topology(3, 1).local_world_size == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(allowed_types=["tablewise"]), "Invalid allowed_types=['tablewise']. Must be a non-empty list of"),
        (dict(allowed_types=[]), "Invalid allowed_types=[]."),
        (
            dict(table_constraints={"nope": "row_wise"}),
            "Invalid table_constraints: tables ['nope'] are not among the tables planned.",
        ),
        (dict(table_constraints={"t0": "rows"}), "Invalid table_constraints['t0']='rows'."),
        (
            dict(expected_ids_per_batch={"ghost": 1.0}),
            "Invalid expected_ids_per_batch: features ['ghost'] are read by no table.",
        ),
        (
            dict(expected_ids_per_batch={"t0_f": -1.0}),
            "Invalid expected_ids_per_batch['t0_f']=-1.0. Must be a finite number >= 0.",
        ),
        (dict(batch_size_per_rank=0), "Invalid batch_size_per_rank=0. Must be an int >= 1."),
        (dict(data_parallel_max_bytes=-1), "Invalid data_parallel_max_bytes=-1. Must be an int >= 0."),
    ],
)
def test_invalid_planner_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        plan_sharding([table("t0", 100)], Topology(2, MiB), **kwargs)
    assert not isinstance(info.value, PlanningError)


def test_duplicate_table_names_refused():
    with pytest.raises(ValueError, match="table name 't' appears twice"):
        plan_sharding([table("t", 10), table("t", 20)], Topology(1, MiB))


# -- summary ------------------------------------------------------------------------


def test_rank_stats_follow_the_cost_model():
    tables = [table("rw", 1000, dim=8), table("tw", 500, dim=8), table("dp", 10, dim=8)]
    plan = ShardingPlan(2)
    for sharding_type, t in zip(["row_wise", "table_wise", "data_parallel"], tables):
        plan.tables[t.name] = uniform_plan([t], sharding_type, 2).tables[t.name]
    stats = rank_stats(plan, tables, optimizer=RowWiseAdagrad(), batch_size_per_rank=4)
    row = 8 * 4 + 4
    assert stats[0].memory_bytes == 500 * row + 500 * row + 10 * row
    assert stats[1].memory_bytes == 500 * row + 10 * row
    # sharded tables serve both ranks' batches (2 x 4 ids x 8 dims); dp only the rank's own
    assert stats[0].lookup_cost == 32 + 64 + 32
    assert stats[1].lookup_cost == 32 + 32
    assert stats[0].tables == ["rw (rw)", "tw", "dp (dp)"]


def test_plan_summary_is_a_printable_per_rank_table():
    tables = [table(f"t{i}", 100_000) for i in range(4)] + [table("tiny", 10)]
    topology = Topology(2, 16 * MiB)
    plan = plan_sharding(tables, topology)
    text = plan_summary(plan, tables, topology=topology)
    lines = text.splitlines()
    assert lines[0].startswith("Plan over 2 ranks: ") and "(max / mean rank 1.00)" in lines[0]
    assert lines[1].split(" | ")[:5] == ["rank", "memory  ", "budget  ", "used ", "lookups / step"]
    assert len(lines) == 2 + 1 + 2
    assert lines[3].startswith("0    | 12.2 MiB | 16.0 MiB | 76.3% |")
    assert "tiny (dp)" in lines[3] and "tiny (dp)" in lines[4]
    assert "budget" not in plan_summary(plan, tables)


def test_plan_summary_refuses_a_plan_for_other_tables_or_ranks():
    tables = [table("t", 100)]
    plan = uniform_plan(tables, "table_wise", 2)
    with pytest.raises(ValueError, match="tables without a plan"):
        plan_summary(plan, tables + [table("u", 5)])
    with pytest.raises(ValueError, match="world_size=3 but the plan is over 2 ranks"):
        plan_summary(plan, tables, topology=Topology(3, MiB))
    with pytest.raises(ValueError, match="the model's is 200 x 16"):
        plan_summary(plan, [table("t", 200)])
