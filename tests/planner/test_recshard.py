import itertools
import math

import numpy as np
import pytest

from dist_rec.modules.embedding_configs import EmbeddingBagConfig
from dist_rec.planner import PlanningError, ShardingPlan
from dist_rec.planner.access_stats import AccessStats, TableAccessStats
from dist_rec.planner.recshard import (
    TableDemand,
    _candidates,
    plan_recshard,
    table_demands,
    table_greedy,
)
from dist_rec.planner.tiers import Tier, TierModel

TIERS = TierModel([Tier("device", 1 << 30, 10e9), Tier("ssd", 1 << 40, 100e6, 4096)])


def zipf_counts(rows: int, reads: int, exponent: float, seed: int, unused: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    used = max(1, int(rows * (1 - unused)))
    weights = 1.0 / np.arange(1, used + 1) ** exponent
    counts = np.zeros(rows, dtype=np.int64)
    counts[rng.permutation(rows)[:used]] = rng.multinomial(reads, weights / weights.sum())
    return counts


def demand(name: str, rows: int, dim: int, reads_per_batch: float, exponent: float, seed: int, unused=0.0):
    stats = TableAccessStats(name, zipf_counts(rows, 20 * rows, exponent, seed, unused), 1000, 1000, 1000)
    row_bytes = dim * 4 + 4
    return TableDemand(name, rows, row_bytes, reads_per_batch, stats.cdf(), stats.used_rows, dim,
                       {t.name: t.seconds_per_row(dim * 4) for t in TIERS.tiers})  # fmt: skip


def brute_force(demands, world, fast_cap, slow_cap, grid):
    """The lowest slowest-rank cost over every (rank, hot rows) choice."""
    options = [[(g, hot) for g in range(world) for hot in _candidates(d, grid)] for d in demands]
    best = math.inf
    for combo in itertools.product(*options):
        cost, fast_b, slow_b = [0.0] * world, [0] * world, [0] * world
        for d, (g, hot) in zip(demands, combo):
            cost[g] += d.cost(hot, "device", "ssd")
            fast_b[g] += hot * d.row_bytes
            slow_b[g] += (d.num_rows - hot) * d.row_bytes
        if all(f <= fc for f, fc in zip(fast_b, fast_cap)) and all(s <= sc for s, sc in zip(slow_b, slow_cap)):
            best = min(best, max(cost))
    return best


def assert_within_budgets(result, demands, fast_cap, slow_cap):
    """Each rank's hot rows fit its fast budget, the rest its slow one."""
    for g in range(len(fast_cap)):
        mine = [d for d in demands if result.rank_of[d.name] == g]
        assert sum(result.hot_rows[d.name] * d.row_bytes for d in mine) <= fast_cap[g]
        assert sum((d.num_rows - result.hot_rows[d.name]) * d.row_bytes for d in mine) <= slow_cap[g]


def small_instance(rng, seed, tables):
    """``tables`` random small demands: brute force can check their plans."""
    return [
        demand(f"t{i}", int(rng.integers(50, 400)), int(rng.choice([4, 8, 16])), float(rng.uniform(100, 2000)),
               float(rng.uniform(0.6, 1.4)), seed * 10 + i, unused=float(rng.uniform(0, 0.5)))
        for i in range(tables)
    ]  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_the_milp_placement_is_optimal_on_small_instances(seed):
    rng = np.random.default_rng(seed)
    demands = small_instance(rng, seed, 3)
    total = sum(d.num_rows * d.row_bytes for d in demands)
    fast_cap = [int(total * rng.uniform(0.05, 0.3))] * 2
    slow_cap = [int(total * rng.uniform(0.6, 1.0))] * 2
    result = plan_recshard(demands, 2, TIERS, fast_bytes=fast_cap, slow_bytes=slow_cap, grid=4)
    expected = brute_force(demands, 2, fast_cap, slow_cap, grid=4)
    assert result.status == "optimal"
    assert result.candidate_costs_s["milp"] == pytest.approx(expected, rel=1e-5)
    # The greedy plan (finer steps than the grid) is kept only when it is better still.
    assert result.max_rank_cost_s <= expected * (1 + 1e-5)
    assert_within_budgets(result, demands, fast_cap, slow_cap)


def test_the_greedy_plan_is_feasible_and_never_better_than_the_milp():
    rng = np.random.default_rng(7)
    demands = [demand(f"t{i}", int(rng.integers(1000, 20000)), 16, float(rng.uniform(1e3, 1e4)), 1.1, i) for i in range(12)]
    total = sum(d.num_rows * d.row_bytes for d in demands)
    kwargs = dict(fast_bytes=total // 20, slow_bytes=total)
    greedy = plan_recshard(demands, 3, TIERS, use_milp=False, **kwargs)
    milp = plan_recshard(demands, 3, TIERS, **kwargs)
    assert greedy.method == "greedy"
    assert milp.max_rank_cost_s <= greedy.max_rank_cost_s * (1 + 1e-9)
    for result in (greedy, milp):
        for g in range(3):
            mine = [d for d in demands if result.rank_of[d.name] == g]
            assert sum(result.hot_rows[d.name] * d.row_bytes for d in mine) <= total // 20


def test_hot_rows_go_to_skewed_tables_and_beat_table_level_greedy():
    # One big table with a steep Zipf, small flat ones: a fast budget of 10% of the bytes.
    demands = [demand("big", 50_000, 16, 5000.0, 1.2, 1)] + [demand(f"s{i}", 2000, 16, 500.0, 0.2, i + 2) for i in range(4)]
    total = sum(d.num_rows * d.row_bytes for d in demands)
    kwargs = dict(fast_bytes=total // 10, slow_bytes=total)
    recshard = plan_recshard(demands, 2, TIERS, **kwargs)
    baseline = table_greedy(demands, 2, TIERS, **kwargs)
    assert 0 < recshard.hot_rows["big"] < 50_000
    assert recshard.slow_reads_per_batch * 3 < baseline.slow_reads_per_batch
    assert recshard.max_rank_cost_s < baseline.max_rank_cost_s


def test_rows_never_read_stay_in_the_slow_tier():
    d = demand("t", 1000, 8, 100.0, 1.0, 3, unused=0.6)
    result = plan_recshard([d], 1, TIERS, fast_bytes=1000 * d.row_bytes, slow_bytes=1000 * d.row_bytes)
    assert result.hot_rows["t"] == d.used_rows
    assert result.slow_reads_per_batch == pytest.approx(0.0)


def test_an_infeasible_budget_gets_a_readable_error():
    demands = [demand("t_big", 10_000, 16, 10.0, 1.0, 1), demand("t_small", 100, 16, 10.0, 1.0, 2)]
    with pytest.raises(PlanningError, match=r"Cannot place 2 tables .*rank 0: .* device \+ .* ssd.*t_big needs"):
        plan_recshard(demands, 2, TIERS, fast_bytes=1000, slow_bytes=100_000)


def test_the_plan_is_plain_data_with_its_tier_split(tmp_path):
    demands = [demand(f"t{i}", 3000, 8, 1000.0, 1.1, i) for i in range(4)]
    total = sum(d.num_rows * d.row_bytes for d in demands)
    result = plan_recshard(demands, 2, TIERS, fast_bytes=total // 8, slow_bytes=total)
    result.plan.save(tmp_path / "plan.json")
    loaded = ShardingPlan.load(tmp_path / "plan.json")
    assert loaded.to_dict() == result.plan.to_dict()
    for name, table in loaded.tables.items():
        (shard,) = table.shards
        assert shard.hot_rows == result.hot_rows[name] and shard.rank == result.rank_of[name]
        assert shard.location.value == "device"
        assert shard.cold_location is None or shard.cold_location.value == "ssd"
    assert "hot at device" in str(loaded)


def test_demands_come_from_access_statistics():
    configs = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100, feature_names=["f0"])]
    stats = AccessStats({"t0": TableAccessStats("t0", zipf_counts(100, 500, 1.0, 0), 50, 50, 50)}, 10, 5)
    (d,) = table_demands(configs, stats, TIERS, global_batch_size=64)
    assert d.reads_per_batch == pytest.approx(500 / 50 * 64)
    assert d.row_bytes == 8 * 4 + 4
    assert d.read_seconds["ssd"] == pytest.approx(4096 / 100e6)
    wrong = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=99, feature_names=["f0"])]
    with pytest.raises(ValueError, match="t0.*100 rows; the table has 99"):
        table_demands(wrong, stats, TIERS, global_batch_size=64)


def test_a_thousand_tables_get_a_plan_within_the_time_limit():
    rng = np.random.default_rng(0)
    demands = [
        demand(f"t{i}", int(rng.integers(100, 3000)), 8, float(rng.uniform(10, 1000)), float(rng.uniform(0.5, 1.3)), i)
        for i in range(1000)
    ]  # fmt: skip
    total = sum(d.num_rows * d.row_bytes for d in demands)
    result = plan_recshard(demands, 4, TIERS, fast_bytes=total // 40, slow_bytes=total // 3, grid=10, time_limit_s=20)
    assert len(result.plan.tables) == 1000
    assert result.method in ("milp_decomposed", "greedy")  # 44k binaries on 4 ranks: solved in parts
    greedy = plan_recshard(demands, 4, TIERS, fast_bytes=total // 40, slow_bytes=total // 3, use_milp=False)
    assert result.max_rank_cost_s <= greedy.max_rank_cost_s * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_solved_in_parts_the_plan_and_its_lower_bound_bracket_the_optimum(seed, monkeypatch):
    import dist_rec.planner.recshard as recshard

    monkeypatch.setattr(recshard, "MAX_JOINT_BINARIES", 0)  # small enough for brute force, solved in parts
    rng = np.random.default_rng(100 + seed)
    demands = small_instance(rng, seed, 4)
    total = sum(d.num_rows * d.row_bytes for d in demands)
    fast_cap, slow_cap = [int(total * rng.uniform(0.05, 0.3))] * 2, [int(total * rng.uniform(0.6, 1.0))] * 2
    result = plan_recshard(demands, 2, TIERS, fast_bytes=fast_cap, slow_bytes=slow_cap, grid=3)
    optimum = brute_force(demands, 2, fast_cap, slow_cap, grid=3)
    assert "milp_decomposed" in result.candidate_costs_s, result.status
    assert result.lower_bound_s <= optimum * (1 + 1e-6) <= result.candidate_costs_s["milp_decomposed"] * (1 + 2e-6)
    assert_within_budgets(result, demands, fast_cap, slow_cap)


def test_a_thousand_tables_on_eight_ranks_land_close_to_the_lower_bound():
    rng = np.random.default_rng(1)
    demands = [
        demand(f"t{i}", int(rng.integers(100, 3000)), 8, float(rng.uniform(10, 1000)), float(rng.uniform(0.5, 1.3)), i,
               unused=float(rng.uniform(0, 0.9)))
        for i in range(1000)
    ]  # fmt: skip
    total = sum(d.num_rows * d.row_bytes for d in demands)
    kwargs = dict(fast_bytes=total // 80, slow_bytes=total // 4)
    result = plan_recshard(demands, 8, TIERS, grid=20, time_limit_s=60, **kwargs)
    greedy = plan_recshard(demands, 8, TIERS, use_milp=False, **kwargs)
    assert result.status.startswith("decomposed") and result.max_rank_cost_s <= greedy.max_rank_cost_s * (1 + 1e-9)
    assert result.lower_bound_s >= 0.95 * result.candidate_costs_s["milp_decomposed"], result.status


def test_rows_a_sample_never_saw_keep_the_tail_its_singletons_predict():
    from dist_rec.planner.recshard import estimated_cdf

    # 10 reads: row 0 six times, rows 1 and 2 once, row 3 twice; rows 4..9 unseen.
    counts = np.array([6, 1, 1, 2, 0, 0, 0, 0, 0, 0])
    stats = TableAccessStats("t", counts, 10, 10, 10)
    cdf, worth = estimated_cdf(stats)
    unseen = 2 / 10  # reads to rows seen once
    assert worth == 10 and cdf[0] == 0 and cdf[-1] == pytest.approx(1.0)
    assert cdf[4] == pytest.approx(1 - unseen)  # the 4 seen rows keep 80% of the reads
    assert cdf[1] == pytest.approx(0.6 * (1 - unseen))
    assert np.allclose(np.diff(cdf[4:]), unseen / 6)  # the rest spread evenly over the 6 unseen rows
    # No singletons: the sample's own CDF, and unseen rows are worth nothing.
    flat = TableAccessStats("t", np.array([3, 2, 0, 0]), 5, 5, 5)
    cdf, worth = estimated_cdf(flat)
    assert worth == 2 and np.array_equal(cdf, flat.cdf())
