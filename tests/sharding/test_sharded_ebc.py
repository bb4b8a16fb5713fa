"""Sharded tables train exactly like unsharded ones.

Every test spawns gloo ranks. For each sharding type (and a plan mixing
them), a ``ShardedEmbeddingBagCollection`` over 2 ranks, each feeding its
own samples, must give the same pooled outputs and, after 5 fused steps,
the same rows and row-wise state as one unsharded collection fed the whole
batch (gradient = mean of the ranks' gradients). 2D (2 x 2) with a sync
every step and plain averaging must equal "each replica group steps on its
batch, then the replicas are averaged", written out in plain PyTorch.
"""

import pytest
import torch
import torch.distributed as dist

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from dist_rec.distributed import ProcessGroups
from dist_rec.ops.reference import momentum_scaled_sync_ref
from dist_rec.optim import SGD, MomentumScaledRowWiseAdagrad, RowWiseAdagrad
from dist_rec.sharding import (
    COMM_STATS,
    SHARDING_TYPES,
    ShardedEmbeddingBagCollection,
    ShardingPlan,
    table_sharding,
    uniform_plan,
)
from dist_rec.testing.multi_process import run_multi_process

TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=6, num_embeddings=23, feature_names=["f0", "f1"]),
    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=9, feature_names=["f2"], pooling=PoolingType.MEAN),
    EmbeddingBagConfig(name="t2", embedding_dim=5, num_embeddings=40, feature_names=["f3"]),
]
KEYS = ["f0", "f1", "f2", "f3"]
ROWS = {"f0": 23, "f1": 23, "f2": 9, "f3": 40}
WIDTH = 6 + 6 + 8 + 5
STEPS = 5


def _optimizer(name: str):
    if name == "sgd":
        return SGD(lr=0.1)
    if name == "rowwise_adagrad":
        return RowWiseAdagrad(lr=0.1, eps=1e-3)
    if name == "rowwise_adagrad_l2":
        return RowWiseAdagrad(lr=0.1, eps=1e-3, weight_decay=0.01, weight_decay_mode="l2")
    return MomentumScaledRowWiseAdagrad(lr=0.1, eps=1e-3, momentum_scale=1.5, weight_decay=0.02, weight_decay_mode="decoupled")


def _rank_batch(rank: int, step: int, weighted: bool, width: int = WIDTH):
    """Unequal batches per rank, empty bags, repeated (hot) ids; keys in an
    order different from the tables'."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    batch = 2 + 3 * rank
    lengths = torch.randint(0, 5, (len(KEYS), batch), generator=g)
    values = []
    for f, key in enumerate(KEYS):
        hot = torch.randint(0, 3, (int(lengths[f].sum()),), generator=g)
        cold = torch.randint(0, ROWS[key], (int(lengths[f].sum()),), generator=g)
        values.append(torch.where(torch.rand(hot.shape, generator=g) < 0.4, hot, cold))
    values = torch.cat(values)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    kjt = KeyedJaggedTensor(KEYS, values, lengths=lengths.reshape(-1), weights=weights)
    return kjt, torch.randn(batch, width, generator=g, dtype=torch.float64).float()


def _joined_batch(ranks, step: int, weighted: bool, width: int = WIDTH):
    """The batches of ``ranks`` as one, samples in rank order."""
    parts = [_rank_batch(r, step, weighted, width) for r in ranks]
    lengths = torch.cat([p[0].lengths().reshape(len(KEYS), -1) for p in parts], dim=1)
    values, weights = [], []
    for key in KEYS:
        for kjt, _ in parts:
            values.append(kjt[key].values())
            if weighted:
                weights.append(kjt[key].weights())
    kjt = KeyedJaggedTensor(KEYS, torch.cat(values), lengths=lengths.reshape(-1), weights=torch.cat(weights) if weighted else None)
    return kjt, torch.cat([p[1] for p in parts])


def _plans(world: int):
    plans = {t: uniform_plan(TABLES, t, world, local_world_size=world) for t in SHARDING_TYPES}
    mixed = ShardingPlan(world)
    mixed.tables["t0"] = table_sharding("t0", 23, 6, "column_wise", [1, 0])
    mixed.tables["t1"] = table_sharding("t1", 9, 8, "row_wise", list(range(world)))
    mixed.tables["t2"] = table_sharding("t2", 40, 5, "table_wise", [world - 1])
    plans["mixed"] = mixed
    dp_mixed = ShardingPlan(world)
    dp_mixed.tables["t0"] = table_sharding("t0", 23, 6, "data_parallel")
    dp_mixed.tables["t1"] = table_sharding("t1", 9, 8, "table_wise", [0])
    dp_mixed.tables["t2"] = table_sharding("t2", 40, 5, "row_wise", list(range(world)))
    plans["dp_mixed"] = dp_mixed
    return plans


# Row-wise sharding assembles its output as the sum of the ranks' blocks,
# mean-pooled features divided after: TABLES (unequal widths), with every
# table sum-pooled (no division), and with equal widths (the division
# broadcast over [B, F, D]).
SUM_TABLES = [
    EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                       feature_names=c.feature_names)
    for c in TABLES
]  # fmt: skip
EQUAL_WIDTH_TABLES = [
    EmbeddingBagConfig(name=c.name, embedding_dim=8, num_embeddings=c.num_embeddings,
                       feature_names=c.feature_names, pooling=c.pooling)
    for c in TABLES
]  # fmt: skip


def _fresh_reference(optimizer_name: str, weighted: bool, tables=TABLES) -> EmbeddingBagCollection:
    torch.manual_seed(7)
    return EmbeddingBagCollection(tables, is_weighted=weighted, optimizer=_optimizer(optimizer_name))


def _assert_shards_equal(sharded: ShardedEmbeddingBagCollection, reference: EmbeddingBagCollection, what: str) -> None:
    ref_weights = {c.name: bag.weight for c, bag in zip(reference.embedding_bag_configs(), reference.embedding_bags.values())}
    ref_states = reference.optimizer_state()
    for local in sharded.local_shards() + sharded.data_parallel_tables():
        s = local.shard
        weight, state = local.read()
        expected = ref_weights[local.table][s.row_offset : s.row_end, s.col_offset : s.col_end]
        torch.testing.assert_close(weight, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} {local.table} {s}: {m}")
        for name, tensor in state.items():
            torch.testing.assert_close(
                tensor, ref_states[local.table][name][s.row_offset : s.row_end], atol=1e-5, rtol=1e-5,
                msg=lambda m: f"{what} {local.table}.{name} {s}: {m}",
            )


def _equivalence_rank(rank, world_size, optimizer_name, weighted):
    plans = [(name, TABLES, plan) for name, plan in _plans(world_size).items()]
    plans.append(("row_wise, all sum-pooled", SUM_TABLES, uniform_plan(SUM_TABLES, "row_wise", world_size)))
    plans.append(("row_wise, equal widths", EQUAL_WIDTH_TABLES, uniform_plan(EQUAL_WIDTH_TABLES, "row_wise", world_size)))
    for name, tables, plan in plans:
        reference = _fresh_reference(optimizer_name, weighted, tables)
        source = _fresh_reference(optimizer_name, weighted, tables)
        sharded = ShardedEmbeddingBagCollection(
            tables, plan, _optimizer(optimizer_name), is_weighted=weighted, source=source
        )
        if name.startswith("row_wise"):
            assert sharded._output_dist.row_sums, name  # which assembly runs
        width = sum(c.embedding_dim * len(c.feature_names) for c in tables)
        for step in range(STEPS):
            kjt, grad = _rank_batch(rank, step, weighted, width)
            out = sharded(kjt).values()
            full_kjt, full_grad = _joined_batch(range(world_size), step, weighted, width)
            expected = reference(full_kjt).values()
            first = sum(_rank_batch(r, step, weighted)[1].shape[0] for r in range(rank))
            torch.testing.assert_close(
                out, expected[first : first + out.shape[0]].detach(), atol=1e-5, rtol=1e-5,
                msg=lambda m: f"{name} step {step} output: {m}",
            )
            out.backward(grad)
            expected.backward(full_grad / world_size)
            if isinstance(sharded.optimizer, MomentumScaledRowWiseAdagrad):
                sharded.sync_replicas()
                reference.sync()
        _assert_shards_equal(sharded, reference, name)


@pytest.mark.parametrize(
    "optimizer_name, weighted",
    [("rowwise_adagrad", False), ("sgd", True), ("rowwise_adagrad_l2", True), ("momentum_scaled", False)],
)
def test_every_sharding_type_equals_unsharded(optimizer_name, weighted):
    run_multi_process(_equivalence_rank, world_size=2, timeout=240, optimizer_name=optimizer_name, weighted=weighted)


def _average_replicas(collections):
    with torch.no_grad():
        for parts in zip(*[list(c.embedding_bags.values()) for c in collections]):
            mean = torch.stack([p.weight for p in parts]).mean(dim=0)
            for p in parts:
                p.weight.copy_(mean)
        for table in collections[0].optimizer_state():
            for state in collections[0].optimizer_state()[table]:
                tensors = [c.optimizer_state()[table][state] for c in collections]
                mean = torch.stack(tensors).mean(dim=0)
                for t in tensors:
                    t.copy_(mean)


def _momentum_scaled_sync(collections):
    """The reference sync of momentum-scaled row-wise AdaGrad over replicas."""
    with torch.no_grad():
        for table in collections[0].optimizer_state():
            states = [c.optimizer_state()[table] for c in collections]
            weights = [c.embedding_bags[table].weight for c in collections]
            momentum_scaled_sync_ref(
                states[0]["momentum1"], [s["momentum1_increment"] for s in states], weights,
                collections[0].optimizer.momentum_scale,
            )
            for s in states[1:]:
                s["momentum1"].copy_(states[0]["momentum1"])


def _two_d_rank(rank, world_size, sharding_type, layout, optimizer_name):
    groups = ProcessGroups(replicas=2, layout=layout)
    grid = groups.grid
    my_group = grid.my_sharding_group
    plan = uniform_plan(TABLES, sharding_type, grid.group_size, local_world_size=grid.group_size)
    sharded = ShardedEmbeddingBagCollection(
        TABLES, plan, _optimizer(optimizer_name), process_groups=groups, source=_fresh_reference(optimizer_name, False),
    )
    # Reference: one unsharded copy per replica group, each stepping on its
    # group's joined batch, then averaged (weights and row-wise state), or
    # synchronised as momentum-scaled row-wise AdaGrad prescribes.
    replicas = [_fresh_reference(optimizer_name, False) for _ in grid.sharding_groups]
    average = _momentum_scaled_sync if optimizer_name == "momentum_scaled" else _average_replicas
    for step in range(STEPS):
        kjt, grad = _rank_batch(rank, step, False)
        out = sharded(kjt).values()
        for group, reference in zip(grid.sharding_groups, replicas):
            full_kjt, full_grad = _joined_batch(group, step, False)
            expected = reference(full_kjt).values()
            if group == my_group:
                first = sum(_rank_batch(r, step, False)[1].shape[0] for r in group[: group.index(rank)])
                torch.testing.assert_close(out, expected[first : first + out.shape[0]].detach(), atol=1e-5, rtol=1e-5)
            expected.backward(full_grad / len(group))
        out.backward(grad)
        sharded.sync_replicas()
        average(replicas)
    _assert_shards_equal(sharded, replicas[0], f"2D {sharding_type}")


@pytest.mark.parametrize(
    "sharding_type, layout, optimizer_name",
    [
        ("table_wise", "shards_on_host", "rowwise_adagrad"),
        ("row_wise", "replicas_on_host", "rowwise_adagrad"),
        ("column_wise", "shards_on_host", "rowwise_adagrad"),
        ("row_wise", "shards_on_host", "momentum_scaled"),
    ],
)
def test_two_d_equals_step_then_sync(sharding_type, layout, optimizer_name):
    """2 x 2 grid, sync every step: plain averaging equals "local step then
    average"; momentum-scaled row-wise AdaGrad equals its reference sync."""
    run_multi_process(
        _two_d_rank, world_size=4, timeout=240, sharding_type=sharding_type, layout=layout, optimizer_name=optimizer_name
    )


def _bad_input_rank(rank, world_size, feature, value, expected):
    plan = uniform_plan(TABLES, "row_wise", world_size)
    sharded = ShardedEmbeddingBagCollection(TABLES, plan, _optimizer("rowwise_adagrad"))
    kjt, _ = _rank_batch(rank, 0, False)
    if rank == 1:
        values = kjt.values().clone()
        f = KEYS.index(feature)
        start = int(kjt.lengths().view(len(KEYS), -1)[:f].sum())
        assert int(kjt.lengths().view(len(KEYS), -1)[f].sum()) > 0, "the test needs an id of that feature"
        values[start] = value  # the feature's first id
        kjt = KeyedJaggedTensor(KEYS, values, lengths=kjt.lengths())
    with pytest.raises((IndexError, RuntimeError)) as info:
        sharded(kjt)
    message = str(info.value)
    if rank == 1:
        assert all(part in message for part in expected), message
    else:
        assert "rank 1" in message, message
    # The group is still usable after the refusal: a good step on both ranks.
    kjt, grad = _rank_batch(rank, 1, False)
    sharded(kjt).values().backward(grad)


@pytest.mark.parametrize(
    "feature,value,expected",
    [
        ("f3", 40, ["id 40", "'f3'", "'t2'", "40 rows"]),  # f3's table t2 has 40 rows
        ("f2", -1, ["id -1", "'f2'", "'t1'", "9 rows"]),  # a negative id in a middle feature
        ("f0", 23, ["id 23", "'f0'", "'t0'", "23 rows"]),  # the first feature
    ],
)
def test_bad_ids_stop_every_rank_with_a_clear_error(feature, value, expected):
    run_multi_process(_bad_input_rank, world_size=2, timeout=120, feature=feature, value=value, expected=expected)


def _comm_rank(rank, world_size, out):
    plan = uniform_plan(TABLES, "table_wise", world_size)
    sharded = ShardedEmbeddingBagCollection(TABLES, plan, _optimizer("sgd"))
    COMM_STATS.reset()
    kjt, grad = _rank_batch(rank, 0, False)
    sharded(kjt).values().backward(grad)
    stats = COMM_STATS.snapshot()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, stats)
    if rank == 0:
        out.update({"stats": gathered})


def test_comm_stats_count_bytes_sent_to_other_ranks():
    import multiprocessing

    manager = multiprocessing.Manager()
    out = manager.dict()
    run_multi_process(_comm_rank, world_size=2, out=out)
    stats = out["stats"]
    # Table-wise round robin: t0 (f0, f1; 6 wide) and t2 (f3; 5 wide) on rank 0, t1 (f2; 8 wide) on rank 1.
    batches = [2, 5]
    assert stats[0]["output_dist"] == batches[1] * (6 + 6 + 5) * 4
    assert stats[1]["output_dist"] == batches[0] * 8 * 4
    assert stats[0]["output_dist_backward"] == batches[0] * 8 * 4
    assert stats[1]["output_dist_backward"] == batches[1] * (6 + 6 + 5) * 4
    assert stats[0]["input_dist"] > 0 and stats[1]["input_dist"] > 0


def _no_cycles_rank(rank, world_size):
    import gc

    plans = [(name, TABLES, plan) for name, plan in _plans(world_size).items()]
    plans.append(("row_wise, all sum-pooled", SUM_TABLES, uniform_plan(SUM_TABLES, "row_wise", world_size)))
    for name, tables, plan in plans:
        sharded = ShardedEmbeddingBagCollection(tables, plan, _optimizer("rowwise_adagrad"))
        width = sum(c.embedding_dim * len(c.feature_names) for c in tables)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for step in range(2):
                kjt, grad = _rank_batch(rank, step, False, width)
                sharded(kjt).values().backward(grad)
            gc.collect()
            cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, torch.Tensor) or type(o).__name__.endswith("Box")]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert not cyclic, f"{name}: a step left these in reference cycles (freed only by the garbage collector): {cyclic}"


def test_a_step_frees_its_buffers_without_the_garbage_collector():
    """The lookup's output goes back to its pool (or the allocator) when the
    step is done with it: held in a reference cycle, it waited for the
    garbage collector, and every step mapped and faulted in a fresh buffer."""
    run_multi_process(_no_cycles_rank, world_size=2, timeout=120)
