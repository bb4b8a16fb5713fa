"""``TrainPipelineSparseDist`` trains exactly as the plain loop.

On 2 gloo ranks, a DLRM under ``DistributedModelParallel`` trains several
steps with the plain loop (forward, backward, step, sync) and, from the same
init, with the pipeline (the next batch's input dist started a step ahead):
the losses and every weight (dense, and the tables gathered whole) must be
identical. Uneven batches per rank and a mixed plan (table-, row-,
column-wise and data-parallel) included; bad ids in a batch sent ahead stop
every rank when that batch is trained, with the plain loop's errors.
"""

import pytest
import torch
import torch.nn.functional as F

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.data.batch import Batch
from dist_rec.models import DLRM
from dist_rec.optim import RowWiseAdagrad
from dist_rec.sharding import DistributedModelParallel, ShardingPlan, table_sharding
from dist_rec.sharding.pipeline import TrainPipelineSparseDist
from dist_rec.testing.multi_process import run_multi_process

TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=rows, feature_names=[f"f{i}"])
    for i, rows in enumerate([500, 30, 70, 2000])
]
KEYS = [f"f{i}" for i in range(len(TABLES))]
STEPS = 6


def _batch(rank: int, step: int, bad: bool = False) -> Batch:
    g = torch.Generator().manual_seed(100 * step + rank)
    batch = 6 + 3 * rank + step % 2  # uneven over ranks and steps
    lengths = torch.randint(0, 4, (len(KEYS) * batch,), generator=g)
    per_feature = lengths.view(len(KEYS), batch).sum(dim=1)
    values = torch.cat([torch.randint(0, t.num_embeddings, (int(n),), generator=g) for t, n in zip(TABLES, per_feature)])
    if bad and values.numel():
        values[-1] = TABLES[-1].num_embeddings  # out of range for the last feature's table
    kjt = KeyedJaggedTensor(KEYS, values, lengths=lengths)
    return Batch(torch.randn(batch, 4, generator=g), kjt, torch.rand(batch, generator=g).round())


def _plan(kind: str, world: int):
    if kind != "mixed":
        return None
    plan = ShardingPlan(world)
    plan.tables["t0"] = table_sharding("t0", 500, 8, "row_wise", list(range(world)))
    plan.tables["t1"] = table_sharding("t1", 30, 8, "table_wise", [1])
    plan.tables["t2"] = table_sharding("t2", 70, 8, "data_parallel")
    plan.tables["t3"] = table_sharding("t3", 2000, 8, "column_wise", [1, 0])
    return plan


def _setup(kind: str, world: int):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(TABLES, optimizer=RowWiseAdagrad(lr=0.05))
    model = DLRM(ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1])
    plan = _plan(kind, world)
    dmp = DistributedModelParallel(model, plan={"sparse_arch": plan} if plan else None,
                                   sharding_type=None if plan else kind)  # fmt: skip
    optimizer = torch.optim.Adagrad([p for n, p in dmp.named_parameters() if "sparse_arch" not in n], lr=0.05)
    return dmp, optimizer


def _loss(model, batch: Batch) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(batch.dense_features, batch.sparse_features).reshape(-1), batch.labels)


def _weights(dmp):
    tables, _ = dmp.sharded["sparse_arch"].gather_unsharded()
    dense = {n: p.detach().clone() for n, p in dmp.named_parameters() if "sparse_arch" not in n}
    return {**tables, **dense}


def _plain_loop(model, optimizer, batches, after_step=lambda: None) -> list:
    """Forward, backward, step (and 2D sync) per batch: the reference loop."""
    losses = []
    for batch in batches:
        loss = _loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hasattr(model, "sync"):
            model.sync()
        losses.append(loss.detach())
        after_step()
    return losses


def _equal_rank(rank, world_size, kind):
    batches = [_batch(rank, step) for step in range(STEPS)]
    dmp, optimizer = _setup(kind, world_size)
    plain = _plain_loop(dmp, optimizer, batches)
    expected = _weights(dmp)

    dmp, optimizer = _setup(kind, world_size)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, _loss)
    it = iter(batches)
    piped = [pipeline.progress(it) for _ in range(STEPS)]
    with pytest.raises(StopIteration):
        pipeline.progress(it)
    for step, (a, b) in enumerate(zip(plain, piped)):
        assert torch.equal(a, b), f"{kind} rank {rank} step {step}: loss {float(a)} (plain) vs {float(b)} (pipeline)"
    for name, tensor in _weights(dmp).items():
        assert torch.equal(tensor, expected[name]), f"{kind} rank {rank}: {name} differs from the plain loop"


@pytest.mark.parametrize("kind", ["table_wise", "row_wise", "mixed"])
def test_pipeline_trains_as_the_plain_loop(kind):
    run_multi_process(_equal_rank, world_size=2, timeout=180, kind=kind)


def _bad_rank(rank, world_size):
    dmp, optimizer = _setup("table_wise", world_size)
    batches = [_batch(rank, 0), _batch(rank, 1, bad=rank == 1), _batch(rank, 2)]
    pipeline = TrainPipelineSparseDist(dmp, optimizer, _loss)
    it = iter(batches)
    pipeline.progress(it)  # step 0 trains while the bad batch is already sent ahead
    with pytest.raises((IndexError, RuntimeError)) as error:
        pipeline.progress(it)
    message = str(error.value)
    if rank == 1:
        assert "out of range" in message and "'f3'" in message, message
    else:
        assert "rank 1" in message, message


def test_bad_ids_sent_ahead_stop_every_rank_when_trained():
    run_multi_process(_bad_rank, world_size=2, timeout=120)


def _evaluation_between_steps_rank(rank, world_size):
    """An evaluation forward (no grad, another batch) between pipelined
    steps, while the next batch's input dist is in flight, as the trainer
    runs it: training is unchanged, and the evaluation outputs equal the
    plain loop's."""
    batches = [_batch(rank, step) for step in range(STEPS)]
    probe = _batch(rank, 99)

    def evaluate(dmp):
        with torch.no_grad():
            return dmp(probe.dense_features, probe.sparse_features).detach()

    dmp, optimizer = _setup("mixed", world_size)
    plain_outputs = []
    _plain_loop(dmp, optimizer, batches, after_step=lambda: plain_outputs.append(evaluate(dmp)))
    expected = _weights(dmp)

    dmp, optimizer = _setup("mixed", world_size)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, _loss)
    it = iter(batches)
    for step in range(STEPS):
        pipeline.progress(it)
        assert torch.equal(evaluate(dmp), plain_outputs[step]), f"rank {rank} step {step}: evaluation output"
    for name, tensor in _weights(dmp).items():
        assert torch.equal(tensor, expected[name]), f"rank {rank}: {name} differs from the plain loop"


def test_evaluation_between_pipelined_steps():
    run_multi_process(_evaluation_between_steps_rank, world_size=2, timeout=180)


def test_a_model_without_sharded_tables_trains_through_the_same_pipeline():
    """One process, an unsharded DLRM: the pipeline's stages are empty and
    it trains exactly as the plain loop."""
    batches = [_batch(0, step) for step in range(STEPS)]

    def setup():
        torch.manual_seed(0)
        ebc = EmbeddingBagCollection(TABLES, optimizer=RowWiseAdagrad(lr=0.05))
        model = DLRM(ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1])
        return model, torch.optim.Adagrad([p for p in model.parameters() if p.requires_grad], lr=0.05)

    model, optimizer = setup()
    plain = _plain_loop(model, optimizer, batches)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer = setup()
    pipeline = TrainPipelineSparseDist(model, optimizer, _loss)
    it = iter(batches)
    piped = [pipeline.progress(it) for _ in range(STEPS)]
    assert all(torch.equal(a, b) for a, b in zip(plain, piped))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
