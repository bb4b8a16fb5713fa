"""``DistributedModelParallel`` on a DLRM: sharded training equals one
process on the global batch (the table-wise path hands the interaction the
received blocks as they are), tables that never exist whole (meta device),
plans from the planner, table-wise placement (balanced, and alike in every
sharding group of a 2D grid), and 2D replicas kept equal."""

from unittest import mock

import pytest
import torch
import torch.distributed as dist

import dist_rec.models.dlrm as dlrm_module
from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from dist_rec.models import DLRM
from dist_rec.optim import RowWiseAdagrad
from dist_rec.planner import PlanningError
from dist_rec.sharding import DistributedModelParallel, ShardedEmbeddingBagCollection
from dist_rec.testing.multi_process import run_multi_process

TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=rows, feature_names=[f"f{i}"])
    for i, rows in enumerate([5000, 300, 70, 20000])
]
KEYS = [f"f{i}" for i in range(len(TABLES))]


def _batch(rank: int, step: int, batch: int = 16):
    g = torch.Generator().manual_seed(10 * step + rank)
    lengths = torch.randint(0, 3, (len(KEYS) * batch,), generator=g)
    per_feature = lengths.view(len(KEYS), batch).sum(dim=1)
    values = torch.cat([torch.randint(0, t.num_embeddings, (int(n),), generator=g) for t, n in zip(TABLES, per_feature)])
    return torch.randn(batch, 4, generator=g), KeyedJaggedTensor(KEYS, values, lengths=lengths), torch.rand(batch, generator=g).round()


def _model(device="cpu"):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(TABLES, device=device, optimizer=RowWiseAdagrad(lr=0.05))
    model = DLRM(ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1])
    return model


def _train(dmp, rank, steps=3, batch=None):
    """``steps`` steps with a sync after each, on ``batch(rank, step)`` (default ``_batch``)."""
    optimizer = torch.optim.Adagrad([p for p in dmp.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(steps):
        dense, kjt, labels = (batch or _batch)(rank, step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(dense, kjt).reshape(-1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dmp.sync()
        losses.append(float(loss))
    return losses


MIXED_TABLES = TABLES[:3] + [  # a mean-pooled table among sum-pooled ones
    EmbeddingBagConfig(name="t3", embedding_dim=8, num_embeddings=20000, feature_names=["f3"], pooling=PoolingType.MEAN)
]


def _mixed_model():
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(MIXED_TABLES, optimizer=RowWiseAdagrad(lr=0.05))
    return DLRM(ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1])


def _global_batch(step: int, world_size: int):
    """Every rank's batch of ``step`` joined in rank order."""
    parts = [_batch(r, step) for r in range(world_size)]
    batch = parts[0][1].stride()
    lengths = [p[1].lengths().view(len(KEYS), batch) for p in parts]
    values = [torch.split(p[1].values(), l.sum(dim=1).tolist()) for p, l in zip(parts, lengths)]
    kjt = KeyedJaggedTensor(
        KEYS,
        torch.cat([v[f] for f in range(len(KEYS)) for v in values]),
        lengths=torch.cat(lengths, dim=1).reshape(-1),
    )
    return torch.cat([p[0] for p in parts]), kjt, torch.cat([p[2] for p in parts])


def _equal_to_global_rank(rank, world_size, sharding_type, blocks_expected):
    dmp = DistributedModelParallel(_mixed_model(), sharding_type=sharding_type)
    reference = _mixed_model()
    read = mock.patch.object(dlrm_module, "dot_interaction_blocks", wraps=dlrm_module.dot_interaction_blocks)
    with read as spy:
        losses = _train(dmp, rank, steps=5)
    assert spy.called == blocks_expected, f"{sharding_type}: blocks path taken {spy.called}, expected {blocks_expected}"
    mean_losses = torch.tensor(losses)
    dist.all_reduce(mean_losses)
    mean_losses /= world_size
    optimizer = torch.optim.Adagrad([p for p in reference.parameters() if p.requires_grad], lr=0.05)
    for step in range(5):
        dense, kjt, labels = _global_batch(step, world_size)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(reference(dense, kjt).reshape(-1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert abs(float(loss) - float(mean_losses[step])) < 1e-5, (step, float(loss), float(mean_losses[step]))
    tables, _ = dmp.sharded["sparse_arch"].gather_unsharded()
    for name, weight in tables.items():
        torch.testing.assert_close(weight, reference.sparse_arch.state_dict()[name], rtol=1e-5, atol=1e-5, msg=name)
    trained = {n: p for n, p in dmp.unwrapped.named_parameters() if p.requires_grad}
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "sharding_type,blocks_expected", [("table_wise", True), ("row_wise", False), ("column_wise", False)]
)
def test_sharded_dlrm_trains_as_one_process_on_the_global_batch(sharding_type, blocks_expected):
    run_multi_process(_equal_to_global_rank, world_size=2, sharding_type=sharding_type, blocks_expected=blocks_expected)


# Round-robin by table order would put both large tables on the same rank.
PLACEMENT_ROWS = [20000, 10, 20000, 10, 300, 70]
PLACEMENT_TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
    for i, n in enumerate(PLACEMENT_ROWS)
]


def _placement_model():
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(PLACEMENT_TABLES, optimizer=RowWiseAdagrad(lr=0.05))
    return DLRM(ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1])


def _placement_batch(rank: int, step: int, batch: int = 8):
    g = torch.Generator().manual_seed(10 * step + rank)
    lengths = torch.randint(0, 3, (len(PLACEMENT_ROWS), batch), generator=g)
    values = torch.cat([torch.randint(0, n, (int(k),), generator=g) for n, k in zip(PLACEMENT_ROWS, lengths.sum(1))])
    kjt = KeyedJaggedTensor([t.feature_names[0] for t in PLACEMENT_TABLES], values, lengths=lengths.reshape(-1))
    return torch.randn(batch, 4, generator=g), kjt, torch.rand(batch, generator=g).round()


def _assert_replicas_equal(dmp) -> None:
    """Every shard this rank holds equals its replica's, bit for bit (weights and state)."""
    for local in dmp.sharded["sparse_arch"].local_shards():
        weight, state = local.read()
        for tensor in [weight, *state.values()]:
            copies = [torch.empty_like(tensor) for _ in range(2)]
            dist.all_gather(copies, tensor, group=dmp.process_groups.replica_group)
            torch.testing.assert_close(copies[0], copies[1], rtol=0, atol=0, msg=local.table)


def _table_wise_placement_rank(rank, world_size):
    rows = PLACEMENT_ROWS
    plan = DistributedModelParallel(_placement_model(), sharding_type="table_wise").plans["sparse_arch"]
    plans = [None] * world_size
    dist.all_gather_object(plans, plan.to_dict())
    assert plans[0] == plans[1]  # every rank plans alone: the same plan
    placed = {t.table: t.ranks for t in plan.tables.values()}
    assert all(t.sharding_type == "table_wise" and len(t.ranks) == 1 for t in plan.tables.values()), str(plan)
    assert placed["t0"] != placed["t2"], placed
    held = [sum(n for i, n in enumerate(rows) if placed[f"t{i}"] == [r]) for r in range(world_size)]
    assert max(held) - min(held) <= 300, held
    assert [sum(ranks == [r] for ranks in placed.values()) for r in range(world_size)] == [3, 3], placed
    # memory_per_rank bounds the placement: 20000 rows x (8 x 4 B + 4 B of state) = 703 KiB fit no rank of 600 KB.
    with pytest.raises(PlanningError, match="t0 needs 703.1 KiB"):
        DistributedModelParallel(_placement_model(), sharding_type="table_wise", memory_per_rank=600_000)


def test_table_wise_balances_the_ranks_rather_than_dealing_tables_round_robin():
    run_multi_process(_table_wise_placement_rank, world_size=2)


def _table_wise_two_d_rank(rank, world_size):
    # 2 sharding groups of 2 ranks: each group places the tables over its own ranks, every group the same way.
    dmp = DistributedModelParallel(_placement_model(), sharding_type="table_wise", replicas=2)
    plan = dmp.plans["sparse_arch"]
    assert plan.world_size == 2, str(plan)
    plans = [None] * world_size
    dist.all_gather_object(plans, plan)
    assert all(p == plans[0] for p in plans), "the ranks planned differently"
    placed = {t.table: t.ranks for t in plan.tables.values()}
    assert placed["t0"] != placed["t2"], placed  # the two large tables on different ranks of a group
    # A rank holds the tables its position in its group was given, and its replica (the same position in
    # the other group) holds the same ones.
    grid = dmp.grid
    position = grid.my_sharding_group.index(rank)
    held = sorted(local.table for local in dmp.sharded["sparse_arch"].local_shards())
    assert held == sorted(t for t, ranks in placed.items() if ranks == [position]), (rank, held, placed)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, (grid.replica_index, position, held))
    assert {p: h for i, p, h in everyone if i == 0} == {p: h for i, p, h in everyone if i == 1}, everyone
    # After steps on each rank's own data and a sync, every replica of a table holds the same rows and state.
    _train(dmp, rank, batch=_placement_batch)
    _assert_replicas_equal(dmp)


def test_table_wise_two_d_places_each_group_alike_and_keeps_replicas_equal():
    run_multi_process(_table_wise_two_d_rank, world_size=4, timeout=180)


def _meta_rank(rank, world_size):
    # The tables exist only as shards: each rank allocates its half of the rows.
    model = _model(device="meta")
    model.dense_arch.to_empty(device="cpu")
    model.over_arch.to_empty(device="cpu")
    for module in list(model.dense_arch.modules()) + list(model.over_arch.modules()):
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    dmp = DistributedModelParallel(model, sharding_type="row_wise")
    sharded = dmp.sharded["sparse_arch"]
    assert isinstance(model.sparse_arch, ShardedEmbeddingBagCollection)
    weights = [local.read()[0] for local in sharded.local_shards()]
    held = sum(weight.numel() for weight in weights)
    assert held == sum(t.num_embeddings * t.embedding_dim for t in TABLES) // world_size
    assert all(weight.device.type == "cpu" and weight.abs().sum() > 0 for weight in weights)
    losses = _train(dmp, rank)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_tables_initialised_as_shards_from_a_meta_model():
    run_multi_process(_meta_rank, world_size=2)


def _planned_two_d_rank(rank, world_size):
    model = _model()
    dmp = DistributedModelParallel(model, replicas=2, memory_per_rank=600_000)  # the planner decides
    plan = dmp.plans["sparse_arch"]
    types = {t.table: t.sharding_type for t in plan.tables.values()}
    assert types["t3"] in ("row_wise", "table_row_wise"), str(plan)  # 20000 x 8 x (4 B + state) = 720 kB > 600 kB
    _train(dmp, rank)
    # Replicas of every shard are equal after sync(); dense layers equal everywhere.
    _assert_replicas_equal(dmp)
    for name, p in dmp.unwrapped.named_parameters():
        if not p.requires_grad:  # shards (the fused tables do not require grad)
            continue
        copies = [torch.empty_like(p) for _ in range(world_size)]
        dist.all_gather(copies, p.detach())
        for c in copies[1:]:
            torch.testing.assert_close(c, copies[0], rtol=0, atol=0, msg=name)


def test_planned_two_d_model_keeps_replicas_and_dense_layers_equal():
    run_multi_process(_planned_two_d_rank, world_size=4, timeout=180)
