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


def _reduce_rank(rank, world_size, slot_bytes, slots):
    """The transport's scaled, block-wise and summing all-to-alls against
    gloo's all-to-all followed by the plain ops, bit for bit; ``comm``'s
    row-shard sum over either transport (shared memory adds in place for
    two ranks, else on wait) against the same."""
    from dist_rec.sharding.comm import all_to_all, all_to_all_blocks, sum_row_shards

    groups = ProcessGroups()
    shm_group = groups.subgroup("test/shm")
    transport = intra_host_all_to_all(shm_group, torch.device("cpu"), slot_bytes=slot_bytes, slots=slots)
    gloo_group = groups.subgroup("test/gloo")
    for round_ in range(3):
        for dtype in (torch.float32, torch.float64):
            counts = _splits(7 + round_, world_size, 200)
            send, recv = counts[rank].tolist(), counts[:, rank].tolist()
            g = torch.Generator().manual_seed(100 * round_ + rank)
            tensor = torch.randn(sum(send), generator=g, dtype=dtype)
            expected = tensor.new_empty(sum(recv))
            dist.all_to_all_single(expected, tensor, recv, send, group=gloo_group)

            started = [transport.all_to_all(tensor, send, recv, 0.5), transport.all_to_all(tensor, send, recv)]
            for output, work in started:
                work.wait()
            assert torch.equal(started[0][0], expected * 0.5) and torch.equal(started[1][0], expected)
            for group in (shm_group, gloo_group):  # comm's wrappers, either transport
                pending = []
                output = all_to_all(tensor, send, recv, group, "test", pending, scale=0.25)
                pending[0].wait()
                assert torch.equal(output, expected * 0.25)

            # One tensor to every rank: no joined copy on the shared-memory side.
            block = torch.randn(int(counts[rank, rank]), generator=g, dtype=dtype)
            same = [int(counts[rank, rank])] * world_size
            from_all = [int(counts[r, r]) for r in range(world_size)]
            expected_blocks = tensor.new_empty(sum(from_all))
            dist.all_to_all_single(expected_blocks, block.repeat(world_size), from_all, same, group=gloo_group)
            for group in (shm_group, gloo_group):
                pending = []
                output = all_to_all_blocks([block] * world_size, from_all, group, "test", pending, scale=0.5)
                pending[0].wait()
                assert torch.equal(output, expected_blocks * 0.5)

            # Row shards' partial sums: every rank receives the same count.
            mine = int(counts[0, rank])
            sizes = [int(counts[0, r]) for r in range(world_size)]
            partial = torch.randn(sum(sizes), generator=g, dtype=dtype)
            parts = partial.new_empty(mine * world_size)
            dist.all_to_all_single(parts, partial, [mine] * world_size, sizes, group=gloo_group)
            parts = parts.view(world_size, mine)
            reference = parts[0] + parts[1]
            for extra in parts[2:]:
                reference = reference + extra
            for group in (shm_group, gloo_group):
                pending = []
                output = sum_row_shards(partial, sizes, group, "test", pending)
                pending[0].wait()
                assert torch.equal(output, reference), (group is shm_group, dtype, round_)
            if world_size == 2:
                output, work = transport.sum_blocks(partial, sizes)
                work.wait()
                assert torch.equal(output, reference)
            else:
                with pytest.raises(ValueError, match="adds two ranks"):
                    transport.sum_blocks(partial, sizes)

            # ``then`` on the summed rows: by pieces of whole rows where a row
            # fits a slot (width 2), on all of them at the end where not (40).
            for width in (2, 40):
                rows = [int(counts[0, r]) % 7 for r in range(world_size)]
                partial = torch.randn(sum(rows) * width, generator=g, dtype=dtype)
                parts = partial.new_empty(rows[rank] * width * world_size)
                dist.all_to_all_single(parts, partial, [rows[rank] * width] * world_size, [n * width for n in rows], group=gloo_group)
                parts = parts.view(world_size, rows[rank], width)
                divisor = torch.arange(1.0, rows[rank] + 1, dtype=dtype)[:, None]
                reference = parts[0] + parts[1]
                for extra in parts[2:]:
                    reference = reference + extra
                reference = reference / divisor
                for group in (shm_group, gloo_group):
                    seen = []

                    def divide_(block, first):
                        seen.append((first, block.shape[0]))
                        block.div_(divisor[first : first + block.shape[0]])

                    pending = []
                    output = sum_row_shards(partial, [n * width for n in rows], group, "test", pending, width, divide_)
                    pending[0].wait()
                    assert torch.equal(output.view(-1, width), reference), (group is shm_group, width)
                    assert sum(n for _, n in seen) == rows[rank]  # every row divided once


@pytest.mark.parametrize(
    "world_size,slot_bytes,slots",
    [
        (2, 2 << 20, 4),
        (2, 64, 2),  # many pieces per message: the in-place sum walks offsets over the slots
        (3, 128, 3),  # three ranks: received, then summed in rank order
    ],
)
def test_scaled_blockwise_and_summing_all_to_alls_give_the_bits_of_gloo_and_plain_ops(world_size, slot_bytes, slots):
    run_multi_process(_reduce_rank, world_size=world_size, slot_bytes=slot_bytes, slots=slots)


def test_slots_must_hold_whole_elements():
    from dist_rec.distributed.shm_transport import ShmAllToAll

    with pytest.raises(ValueError, match="slot_bytes=100"):
        ShmAllToAll(None, slot_bytes=100)


TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=rows, feature_names=[f"f{i}"])
    for i, rows in enumerate([500, 30, 7000])
]
# Row-wise with a mean-pooled table: the sum is divided in place on arrival.
MIXED_POOLING = [
    EmbeddingBagConfig(
        name=f"t{i}", embedding_dim=8, num_embeddings=rows, feature_names=[f"f{i}"], pooling="MEAN" if i != 1 else "SUM"
    )
    for i, rows in enumerate([500, 30, 7000])
]


class _Model(torch.nn.Module):
    def __init__(self, tables=TABLES):
        super().__init__()
        torch.manual_seed(0)
        self.sparse_arch = EmbeddingBagCollection(tables, optimizer=RowWiseAdagrad(lr=0.1))
        self.top = torch.nn.Linear(24, 1)

    def forward(self, kjt):
        # In place on the pooled output, as a user may: it must be a tensor
        # of its own (a view of a custom function's input refuses this).
        return self.top(self.sparse_arch(kjt).values().mul_(1.0))


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


def _same_training_rank(rank, world_size, sharding_type, tables):
    os.environ[ENV] = "gloo"
    over_gloo = DistributedModelParallel(_Model(tables), sharding_type=sharding_type)
    del os.environ[ENV]
    over_shm = DistributedModelParallel(_Model(tables), sharding_type=sharding_type)
    assert transport_for(over_gloo.process_groups.sharding_group) is None
    assert transport_for(over_shm.process_groups.sharding_group) is not None
    losses_gloo, tables_gloo = _train(over_gloo, rank)
    losses_shm, tables_shm = _train(over_shm, rank)
    assert losses_gloo == losses_shm
    for name in tables_gloo:
        assert torch.equal(tables_gloo[name], tables_shm[name]), name


@pytest.mark.parametrize(
    "sharding_type,tables", [("table_wise", TABLES), ("row_wise", TABLES), ("row_wise", MIXED_POOLING)],
    ids=["table_wise", "row_wise", "row_wise-mean"],
)
def test_sharded_training_is_identical_over_either_transport(sharding_type, tables):
    run_multi_process(_same_training_rank, world_size=2, sharding_type=sharding_type, tables=tables)


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
