"""A sharded DLRM whose plan splits tables over two tiers (hot rows in
memory, the rest on SSD through ``TieredStorage``) trains exactly like the
same model in memory, for table-wise and row-wise tables, with rows
renumbered hottest first; its checkpoint loads into an untiered model on
another plan and back.

2 gloo ranks, fused row-wise AdaGrad; hot fractions 0, in between and 1.
"""

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.checkpoint import load_checkpoint, save_checkpoint
from dist_rec.models import DLRM
from dist_rec.optim import RowWiseAdagrad
from dist_rec.placement.tiered import TieredStorage
from dist_rec.sharding import DistributedModelParallel, ShardingPlan, table_sharding, uniform_plan
from dist_rec.testing.multi_process import run_multi_process

from test_sharded_storage import _dense_optimizer, _tables

TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=rows, feature_names=[f"f{i}"])
    for i, rows in enumerate([400, 50, 700, 90])
]
KEYS = [f"f{i}" for i in range(len(TABLES))]
ORDERS = {t.name: np.random.default_rng(i).permutation(t.num_embeddings) for i, t in enumerate(TABLES)}


def _split(sharding, hot_fraction: float):
    shards = [
        dataclasses.replace(s, hot_rows=int(round(hot_fraction * s.num_rows)),
                            cold_location="ssd" if hot_fraction < 1 else None)  # fmt: skip
        for s in sharding.shards
    ]
    return dataclasses.replace(sharding, shards=shards)


def _plan(tiered: bool) -> ShardingPlan:
    plan = ShardingPlan(2)
    plan.tables["t0"] = table_sharding("t0", 400, 8, "row_wise", [0, 1])
    plan.tables["t1"] = table_sharding("t1", 50, 8, "table_wise", [1])
    plan.tables["t2"] = table_sharding("t2", 700, 8, "table_wise", [0])
    plan.tables["t3"] = table_sharding("t3", 90, 8, "table_wise", [1])
    if tiered:
        for name, fraction in (("t0", 0.3), ("t1", 0.0), ("t2", 0.1), ("t3", 1.0)):
            plan.tables[name] = _split(plan.tables[name], fraction)
    return plan


def _model() -> DLRM:
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(TABLES, optimizer=RowWiseAdagrad(lr=0.05, eps=1e-3))
    return DLRM(ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1])


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    batch = 6
    lengths = torch.randint(0, 4, (len(KEYS) * batch,), generator=g)
    per_feature = lengths.view(len(KEYS), batch).sum(dim=1)
    # Ids drawn from a few rows (repeated, on both tiers) and from all of them.
    values = torch.cat([
        torch.where(torch.rand(int(n), generator=g) < 0.5, torch.randint(0, 5, (int(n),), generator=g),
                    torch.randint(0, t.num_embeddings, (int(n),), generator=g))
        for t, n in zip(TABLES, per_feature)
    ])  # fmt: skip
    return torch.randn(batch, 4, generator=g), KeyedJaggedTensor(KEYS, values, lengths=lengths), torch.rand(batch, generator=g).round()


def _train(dmp, optimizer, rank: int, steps) -> list:
    losses = []
    for step in steps:
        dense, kjt, labels = _batch(rank, step)
        loss = F.binary_cross_entropy_with_logits(dmp(dense, kjt).reshape(-1), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        dmp.sync()
        losses.append(loss.detach())
    return losses


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=f"{what}: {name}")


def _rank(rank, world_size, tmp):
    memory = DistributedModelParallel(_model(), plan={"sparse_arch": _plan(False)})
    tiered = DistributedModelParallel(_model(), plan={"sparse_arch": _plan(True)}, storage_dir=f"{tmp}/tiers",
                                      row_orders=ORDERS)  # fmt: skip
    storages = [local.storage for local in tiered.sharded["sparse_arch"].local_shards()]
    assert any(isinstance(s, TieredStorage) for s in storages)
    memory_optimizer, tiered_optimizer = _dense_optimizer(memory), _dense_optimizer(tiered)
    a = _train(memory, memory_optimizer, rank, range(5))
    b = _train(tiered, tiered_optimizer, rank, range(5))
    torch.testing.assert_close(torch.stack(b), torch.stack(a), rtol=0, atol=1e-6)
    trained = _tables(memory)
    _assert_close(_tables(tiered), trained, "after training")

    # The tiered checkpoint loads into an untiered model on another plan, and back into a tiered one.
    save_checkpoint(f"{tmp}/tiered_checkpoint", tiered, tiered_optimizer, step=5)
    untiered = DistributedModelParallel(_model(), plan={"sparse_arch": uniform_plan(TABLES, "row_wise", 2)})
    untiered_optimizer = _dense_optimizer(untiered)
    load_checkpoint(f"{tmp}/tiered_checkpoint", untiered, untiered_optimizer)
    _assert_close(_tables(untiered), trained, "tiered checkpoint loaded untiered")
    save_checkpoint(f"{tmp}/untiered_checkpoint", untiered, untiered_optimizer, step=5)
    back = DistributedModelParallel(_model(), plan={"sparse_arch": _plan(True)}, storage_dir=f"{tmp}/back", row_orders=ORDERS)
    back_optimizer = _dense_optimizer(back)
    load_checkpoint(f"{tmp}/untiered_checkpoint", back, back_optimizer)
    _assert_close(_tables(back), trained, "untiered checkpoint loaded tiered")
    c = _train(back, back_optimizer, rank, range(5, 8))
    d = _train(memory, memory_optimizer, rank, range(5, 8))
    torch.testing.assert_close(torch.stack(c), torch.stack(d), rtol=0, atol=1e-6)


def test_tiered_shards_train_and_checkpoint_like_in_memory(tmp_path):
    run_multi_process(_rank, world_size=2, timeout=300, tmp=str(tmp_path))
