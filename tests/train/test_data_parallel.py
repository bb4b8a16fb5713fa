"""Data-parallel training is exact: N gloo processes with batch B each train
like one process with batch N x B (embeddings with the fused optimizer, and
the dense layers under DDP)."""

import pytest
import torch

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from dist_rec.config import load_config
from dist_rec.optim import RowWiseAdagrad, SGD
from dist_rec.sharding import ShardedEmbeddingBagCollection, data_parallel_embeddings
from dist_rec.testing.multi_process import run_multi_process
from dist_rec.train import Environment, train

TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=30, feature_names=["f0", "f1"]),
    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=7, feature_names=["f2"], pooling=PoolingType.MEAN),
]
KEYS = ["f0", "f1", "f2"]
ROWS = {"f0": 30, "f1": 30, "f2": 7}


def _rank_batch(rank: int, step: int, weighted: bool):
    """Different batch sizes per rank, empty bags, repeated (hot) ids."""
    g = torch.Generator().manual_seed(100 * step + rank)
    batch = 3 + 2 * rank
    lengths = torch.randint(0, 4, (len(KEYS), batch), generator=g)
    values = torch.cat(
        [torch.randint(0, min(ROWS[k], 5), (int(lengths[f].sum()),), generator=g) for f, k in enumerate(KEYS)]
    )
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    kjt = KeyedJaggedTensor(KEYS, values, lengths=lengths.reshape(-1), weights=weights)
    return kjt, torch.randn(batch, 16, generator=g, dtype=torch.float32)


def _global_batch(world: int, step: int, weighted: bool):
    parts = [_rank_batch(r, step, weighted) for r in range(world)]
    lengths = torch.cat([p[0].lengths().reshape(len(KEYS), -1) for p in parts], dim=1)
    values, weights = [], []
    for f, key in enumerate(KEYS):
        for kjt, _ in parts:
            values.append(kjt[key].values())
            if weighted:
                weights.append(kjt[key].weights())
    kjt = KeyedJaggedTensor(
        KEYS, torch.cat(values), lengths=lengths.reshape(-1), weights=torch.cat(weights) if weighted else None
    )
    return kjt, torch.cat([p[1] for p in parts]) / world


def _make_ebc(optimizer, weighted):
    torch.manual_seed(0)
    return EmbeddingBagCollection(tables=TABLES, optimizer=optimizer, is_weighted=weighted)


def _permuted(kjt, order):
    """The same batch with its features in another order."""
    jts = [kjt[KEYS[i]] for i in order]
    weights = torch.cat([j.weights() for j in jts]) if kjt.weights_or_none() is not None else None
    return KeyedJaggedTensor([KEYS[i] for i in order], torch.cat([j.values() for j in jts]),
                             lengths=torch.cat([j.lengths() for j in jts]), weights=weights)


def _exchange_rank(rank, world_size, optimizer, weighted, permute, out):
    ebc = _make_ebc(optimizer, weighted)
    if rank == 1:  # differs before wrapping: wrapping broadcasts rank 0's copy
        with torch.no_grad():
            for w in ebc.parameters():
                w.add_(1.0)
    sharded = data_parallel_embeddings(ebc)
    assert isinstance(sharded, ShardedEmbeddingBagCollection)
    for step in range(4):
        kjt, grad = _rank_batch(rank, step, weighted)
        if permute and rank == 1:  # same features, another order: still the global batch's update
            kjt = _permuted(kjt, [2, 0, 1])
        sharded(kjt).values().backward(grad)
    state, optimizer_state = sharded.gather_unsharded()
    torch.save({"state": state, "opt": optimizer_state}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize(
    "optimizer,weighted,permute",
    [
        (RowWiseAdagrad(lr=0.1), False, False),
        (RowWiseAdagrad(lr=0.1, weight_decay=0.01, weight_decay_mode="l2"), True, False),
        (SGD(lr=0.3), True, False),
        (RowWiseAdagrad(lr=0.1), True, True),
    ],
    ids=["rowwise_adagrad", "rowwise_adagrad-l2-weighted", "sgd-weighted", "rowwise_adagrad-feature-orders-differ"],
)
def test_exchange_equals_one_process_on_the_global_batch(tmp_path, optimizer, weighted, permute):
    run_multi_process(_exchange_rank, world_size=2, optimizer=optimizer, weighted=weighted, permute=permute, out=str(tmp_path))
    reference = _make_ebc(optimizer, weighted)
    for step in range(4):
        kjt, grad = _global_batch(2, step, weighted)
        reference(kjt).values().backward(grad)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for name, tensor in reference.state_dict().items():
            torch.testing.assert_close(saved["state"][name], tensor, rtol=0, atol=1e-6)
        for table, states in reference.optimizer_state().items():
            for name, tensor in states.items():
                torch.testing.assert_close(saved["opt"][table][name], tensor, rtol=0, atol=1e-6)


def _config(batch_size: int, dense: str, sparse: str, out: str, interaction: str = "dot"):
    return load_config(
        "launch/configs/tiny.yaml",
        [
            f"train.batch_size={batch_size}",
            "train.steps=20",
            "train.log_every=1",
            "train.eval_every=0",
            f"train.output_dir={out}",
            f"optimizer.dense={dense}",
            f"optimizer.sparse={sparse}",
            "data.mean_bag_length=2.5",
            f"model.interaction={interaction}",
            "model.dcn_low_rank=4",
            # Shampoo: blocks spread over the 2 ranks; roots every 3 steps, split blocks;
            # epsilon 1e-3: DDP's averaged gradient and one process's mean differ in
            # the last bits of float32, which Shampoo magnifies by about 1/epsilon
            # in directions its statistics have barely seen (docs/shampoo.md).
            "optimizer.shampoo.precondition_frequency=3",
            "optimizer.shampoo.max_preconditioner_dim=24",
            "optimizer.shampoo.epsilon=1e-3",
        ],
    )


def _train_rank(rank, world_size, dense, sparse, interaction, sharding, out):
    env = Environment(rank=rank, world_size=world_size, local_world_size=world_size, backend="gloo")
    config = _config(8, dense, sparse, f"{out}/two", interaction)
    config.sharding.type = sharding
    result = train(config, env, quiet=True)
    tables, optimizer_state = result.model.sparse_arch.gather_unsharded()  # a collective
    if rank == 0:
        state = {k: v for k, v in result.model.state_dict().items() if not k.startswith("sparse_arch.")}
        state.update({f"sparse_arch.{k}": v for k, v in tables.items()})
        torch.save({"losses": result.losses, "state": state, "opt": optimizer_state}, f"{out}/two.pt")


@pytest.mark.parametrize(
    "dense,sparse,interaction,sharding",
    [
        ("adagrad", "rowwise_adagrad", "dot", "data_parallel"),
        ("adagrad", "rowwise_adagrad", "dot", "row_wise"),
        ("adam", "sgd", "dot", "table_wise"),
        ("sgd", "rowwise_adagrad", "dcn", "column_wise"),
        ("shampoo", "rowwise_adagrad", "dot", "table_wise"),
    ],
)
def test_two_processes_train_like_one_with_twice_the_batch(tmp_path, dense, sparse, interaction, sharding):
    """Whatever the sharding, 2 processes x B train like 1 process x 2B."""
    run_multi_process(
        _train_rank, world_size=2, dense=dense, sparse=sparse, interaction=interaction, sharding=sharding, out=str(tmp_path)
    )
    one = train(_config(16, dense, sparse, str(tmp_path / "one"), interaction), Environment(), quiet=True)
    two = torch.load(tmp_path / "two.pt")
    assert len(one.losses) == len(two["losses"]) == 20
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one.losses), rtol=0, atol=1e-5)
    state = one.model.state_dict()
    assert set(state) == set(two["state"])
    for name, tensor in state.items():
        torch.testing.assert_close(two["state"][name], tensor, rtol=0, atol=1e-5, msg=name)
    for table, states in one.model.sparse_arch.optimizer_state().items():
        for name, tensor in states.items():
            torch.testing.assert_close(two["opt"][table][name], tensor, rtol=0, atol=1e-5)
    # Not trivially equal: training moved the parameters.
    assert one.losses[-1] < one.losses[0]
