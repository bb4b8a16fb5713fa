"""Momentum-scaled row-wise AdaGrad across real replicas (2 gloo processes):
sync() agrees the accumulator and averages weights exactly as the reference."""

import torch

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.ops import reference as ref
from dist_rec.optim import MomentumScaledRowWiseAdagrad
from dist_rec.testing.multi_process import run_multi_process

TABLES = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=20, feature_names=["f0"])]
SCALE = 1.5


def _replica_batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(0, 4, (5,), generator=g)
    values = torch.randint(0, 20, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(["f0"], values, lengths), torch.randn(5, 8, generator=g)


def _train_and_sync(rank, world_size, out_dir):
    torch.manual_seed(0)  # same initial tables on every replica
    ebc = EmbeddingBagCollection(tables=TABLES, optimizer=MomentumScaledRowWiseAdagrad(lr=0.1, momentum_scale=SCALE))
    for step in range(3):
        kjt, grad = _replica_batch(rank, step)
        ebc(kjt).values().backward(grad)
        if step == 1:
            ebc.sync(torch.distributed.group.WORLD)
    torch.save(
        {"weight": ebc.embedding_bags["t0"].weight.detach().clone(), "state": ebc.optimizer_state()["t0"]},
        f"{out_dir}/rank{rank}.pt",
    )


def _reference(world_size):
    """Every replica's steps and the sync, replayed in one process."""
    torch.manual_seed(0)
    init = EmbeddingBagCollection(tables=TABLES).embedding_bags["t0"].weight.detach()
    weights = [init.double().clone() for _ in range(world_size)]
    m_sync = [torch.zeros(20, dtype=torch.float64) for _ in range(world_size)]
    m_local = [torch.zeros(20, dtype=torch.float64) for _ in range(world_size)]
    layout = ([0], [0], [0])
    for step in range(3):
        for rank in range(world_size):
            kjt, grad = _replica_batch(rank, step)
            ref.fused_backward_ref(
                "momentum_scaled_rowwise_adagrad",
                [weights[rank]],
                [[m_sync[rank]], [m_local[rank]]],
                layout,
                kjt.values(),
                kjt.offsets(),
                None,
                grad,
                learning_rate=0.1,
                eps=1e-8,
                momentum_scale=SCALE,
            )
        if step == 1:
            ref.momentum_scaled_sync_ref(m_sync[0], m_local, weights, SCALE)
            for s in m_sync[1:]:
                s.copy_(m_sync[0])
    return weights, m_sync, m_local


def test_sync_over_two_replicas_matches_reference(tmp_path):
    run_multi_process(_train_and_sync, world_size=2, out_dir=str(tmp_path))
    weights, m_sync, m_local = _reference(2)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(saved["weight"].double(), weights[rank], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(saved["state"]["momentum1"].double(), m_sync[rank], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(saved["state"]["momentum1_increment"].double(), m_local[rank], atol=1e-6, rtol=1e-6)
