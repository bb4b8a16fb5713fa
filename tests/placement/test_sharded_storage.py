"""The storage interface is the only door to a table's rows: a sharded DLRM
whose shards live in memory-mapped files (``MemmapStorage``, the plan
placing every shard on "ssd") trains, syncs its 2D replicas, saves, loads
into another grid and plan (resharding), and trains on exactly as the same
model in memory, bit for bit.

4 gloo ranks as 2 replicas x 2; a plan with row-, table-, column-wise and a
data-parallel table; fused row-wise AdaGrad and its momentum-scaled variant
(whose sync folds increments in through the storage). Every read of a
memory-mapped shard is a copy, so any code path that changed rows without
handing them back to their storage would make the two models differ.
"""

import pytest
import torch
import torch.nn.functional as F

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.checkpoint import load_checkpoint, save_checkpoint
from dist_rec.distributed import ProcessGroups
from dist_rec.models import DLRM
from dist_rec.optim import MomentumScaledRowWiseAdagrad, RowWiseAdagrad
from dist_rec.placement import InMemoryStorage, MemmapStorage
from dist_rec.sharding import DistributedModelParallel, ShardingPlan, table_sharding, uniform_plan
from dist_rec.testing.multi_process import run_multi_process

TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=rows, feature_names=[f"f{i}"])
    for i, rows in enumerate([400, 50, 700, 30])
]
KEYS = [f"f{i}" for i in range(len(TABLES))]


def _optimizer(name: str):
    if name == "momentum_scaled":
        return MomentumScaledRowWiseAdagrad(lr=0.05, eps=1e-3, momentum_scale=1.5)
    return RowWiseAdagrad(lr=0.05, eps=1e-3)


def _plan(location: str) -> ShardingPlan:
    plan = ShardingPlan(2)
    plan.tables["t0"] = table_sharding("t0", 400, 8, "row_wise", [0, 1], location)
    plan.tables["t1"] = table_sharding("t1", 50, 8, "table_wise", [1], location)
    plan.tables["t2"] = table_sharding("t2", 700, 8, "column_wise", [1, 0], location)
    plan.tables["t3"] = table_sharding("t3", 30, 8, "data_parallel")
    return plan


def _model(optimizer_name: str) -> DLRM:
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(TABLES, optimizer=_optimizer(optimizer_name))
    return DLRM(ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1])


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    batch = 4 + rank
    lengths = torch.randint(0, 4, (len(KEYS) * batch,), generator=g)
    per_feature = lengths.view(len(KEYS), batch).sum(dim=1)
    values = torch.cat([torch.randint(0, min(t.num_embeddings, 60), (int(n),), generator=g) for t, n in zip(TABLES, per_feature)])
    return torch.randn(batch, 4, generator=g), KeyedJaggedTensor(KEYS, values, lengths=lengths), torch.rand(batch, generator=g).round()


def _train(dmp, optimizer, rank: int, steps) -> list:
    losses = []
    for step in steps:
        dense, kjt, labels = _batch(rank, step)
        loss = F.binary_cross_entropy_with_logits(dmp(dense, kjt).reshape(-1), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        dmp.sync()  # replica sync every step, through the storages
        losses.append(loss.detach())
    return losses


def _dense_optimizer(dmp):
    return torch.optim.Adagrad([p for p in dmp.parameters() if p.requires_grad], lr=0.05)


def _tables(dmp) -> dict:
    weights, states = dmp.sharded["sparse_arch"].gather_unsharded()
    out = dict(weights)
    out.update({f"{t}.{n}": v for t, s in states.items() for n, v in s.items()})
    return out


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name}"


def _rank(rank, world_size, optimizer_name, tmp):
    groups = ProcessGroups(replicas=2)
    memory = DistributedModelParallel(_model(optimizer_name), plan={"sparse_arch": _plan("device")}, replicas=2,
                                      process_groups=groups)  # fmt: skip
    files = DistributedModelParallel(_model(optimizer_name), plan={"sparse_arch": _plan("ssd")}, replicas=2,
                                     process_groups=groups, storage_dir=f"{tmp}/rows")  # fmt: skip
    sharded = files.sharded["sparse_arch"]
    assert {type(s) for s in sharded.storages()} == {MemmapStorage, InMemoryStorage}  # data-parallel stays in memory
    assert all(isinstance(local.storage, MemmapStorage) for local in sharded.local_shards())

    # Forward, fused update (incl. column blocks' row-state agreement), replica sync.
    memory_optimizer, files_optimizer = _dense_optimizer(memory), _dense_optimizer(files)
    memory_losses = _train(memory, memory_optimizer, rank, range(4))
    files_losses = _train(files, files_optimizer, rank, range(4))
    assert all(torch.equal(a, b) for a, b in zip(memory_losses, files_losses)), (memory_losses, files_losses)
    trained = _tables(memory)
    _assert_equal(_tables(files), trained, "after training")

    # Save each; load each into the other kind of storage on another grid and
    # plan (one replica, every table row-wise over 4 ranks): resharding.
    save_checkpoint(f"{tmp}/memory_checkpoint", memory, memory_optimizer, step=4)
    save_checkpoint(f"{tmp}/files_checkpoint", files, files_optimizer, step=4)
    flat = ProcessGroups(replicas=1)
    into_memory = DistributedModelParallel(_model(optimizer_name), plan={"sparse_arch": uniform_plan(TABLES, "row_wise", 4)},
                                           process_groups=flat)  # fmt: skip
    into_files = DistributedModelParallel(
        _model(optimizer_name), plan={"sparse_arch": uniform_plan(TABLES, "row_wise", 4, location="ssd")},
        process_groups=flat, storage_dir=f"{tmp}/resharded",
    )
    into_memory_optimizer, into_files_optimizer = _dense_optimizer(into_memory), _dense_optimizer(into_files)
    load_checkpoint(f"{tmp}/files_checkpoint", into_memory, into_memory_optimizer)
    load_checkpoint(f"{tmp}/memory_checkpoint", into_files, into_files_optimizer)
    _assert_equal(_tables(into_memory), trained, "files checkpoint loaded into memory")
    _assert_equal(_tables(into_files), trained, "memory checkpoint loaded into files")

    # And both train on alike.
    a = _train(into_memory, into_memory_optimizer, rank, range(4, 7))
    b = _train(into_files, into_files_optimizer, rank, range(4, 7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    _assert_equal(_tables(into_files), _tables(into_memory), "after training on")


@pytest.mark.parametrize("optimizer_name", ["rowwise_adagrad", "momentum_scaled"])
def test_memory_mapped_shards_train_save_load_and_reshard_like_in_memory(tmp_path, optimizer_name):
    run_multi_process(_rank, world_size=4, timeout=300, optimizer_name=optimizer_name, tmp=str(tmp_path))
