"""The shared-memory all-to-all of ranks on one host against gloo's: the
same bytes for random splits (empty messages, messages of many pieces that
reuse the slots, several collectives in flight), every dtype the sharded
collections send; sharded training identical on either transport; a peer
that exits stops the others with an error, not a hang."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.optim import RowWiseAdagrad
from dist_rec.distributed import ProcessGroups
from dist_rec.distributed.shm_transport import ENV, intra_host_all_to_all, transport_for
from dist_rec.sharding import DistributedModelParallel
from dist_rec.testing.multi_process import run_multi_process


def _splits(seed: int, size: int, largest: int):
    """``[size, size]`` elements rank i sends rank j, some of them 0."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, largest, (size, size), generator=g)
    counts[torch.rand(size, size, generator=g) < 0.25] = 0
    return counts


def _equal_rank(rank, world_size, slot_bytes, slots, in_flight):
    groups = ProcessGroups()
    transport = intra_host_all_to_all(groups.subgroup("test/shm"), torch.device("cpu"), slot_bytes=slot_bytes, slots=slots)
    assert transport is not None
    gloo_group = groups.subgroup("test/gloo")
    for round_ in range(3):
        started = []
        for k, dtype in enumerate([torch.int64, torch.float32, torch.float64, torch.int32][:in_flight]):
            counts = _splits(100 * round_ + k, world_size, 300)
            send, recv = counts[rank].tolist(), counts[:, rank].tolist()
            g = torch.Generator().manual_seed(1000 * round_ + 10 * k + rank)
            tensor = (torch.randn(sum(send), generator=g) * 1000).to(dtype)
            output, work = transport.all_to_all(tensor, send, recv)
            started.append((tensor, send, recv, output, work))
        for tensor, send, recv, output, work in started:  # waited in the order they were started
            work.wait()
            expected = tensor.new_empty(sum(recv))
            dist.all_to_all_single(expected, tensor, recv, send, group=gloo_group)
            assert torch.equal(output, expected)


@pytest.mark.parametrize(
    "world_size,slot_bytes,slots,in_flight",
    [
        (2, 2 << 20, 4, 1),  # every message one piece
        (2, 64, 2, 4),  # many pieces per message, slots reused, four collectives in flight
        (3, 128, 3, 3),
    ],
)
def test_same_bytes_as_gloo(world_size, slot_bytes, slots, in_flight):
    run_multi_process(_equal_rank, world_size=world_size, slot_bytes=slot_bytes, slots=slots, in_flight=in_flight)


TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=rows, feature_names=[f"f{i}"])
    for i, rows in enumerate([500, 30, 7000])
]


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.sparse_arch = EmbeddingBagCollection(TABLES, optimizer=RowWiseAdagrad(lr=0.1))
        self.top = torch.nn.Linear(24, 1)

    def forward(self, kjt):
        return self.top(self.sparse_arch(kjt).values())


def _train(dmp, rank):
    losses = []
    optimizer = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=0.1)
    for step in range(4):
        g = torch.Generator().manual_seed(10 * step + rank)
        lengths = torch.randint(0, 4, (3 * 8,), generator=g)
        per_feature = lengths.view(3, 8).sum(dim=1)
        values = torch.cat([torch.randint(0, t.num_embeddings, (int(n),), generator=g) for t, n in zip(TABLES, per_feature)])
        loss = dmp(KeyedJaggedTensor([f"f{i}" for i in range(3)], values, lengths=lengths)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    tables, _ = dmp.sharded["sparse_arch"].gather_unsharded()
    return losses, tables


def _same_training_rank(rank, world_size, sharding_type):
    os.environ[ENV] = "gloo"
    over_gloo = DistributedModelParallel(_Model(), sharding_type=sharding_type)
    del os.environ[ENV]
    over_shm = DistributedModelParallel(_Model(), sharding_type=sharding_type)
    assert transport_for(over_gloo.process_groups.sharding_group) is None
    assert transport_for(over_shm.process_groups.sharding_group) is not None
    losses_gloo, tables_gloo = _train(over_gloo, rank)
    losses_shm, tables_shm = _train(over_shm, rank)
    assert losses_gloo == losses_shm
    for name in tables_gloo:
        assert torch.equal(tables_gloo[name], tables_shm[name]), name


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_sharded_training_is_identical_over_either_transport(sharding_type):
    run_multi_process(_same_training_rank, world_size=2, sharding_type=sharding_type)


def _peer_exits_rank(rank, world_size):
    transport = transport_for(ProcessGroups().sharding_group)
    dist.barrier()
    if rank == 1:
        os._exit(0)  # gone without taking part
    time.sleep(0.2)
    output, work = transport.all_to_all(torch.arange(4.0), [2, 2], [2, 2])
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 of the group .* has exited"):
        work.wait()
    assert time.monotonic() - started < 10
    os._exit(0)  # the group is broken: leave without its final barrier


def test_an_exited_peer_raises_instead_of_hanging():
    run_multi_process(_peer_exits_rank, world_size=2, timeout=60)
