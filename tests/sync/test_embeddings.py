"""2D embedding replicas averaged in the background, on a 2 x 2 grid of
gloo ranks: with training paused the rounds leave every copy at the mean
of the replicas (weights and row-wise state); a fused update landing
during a round stays; refusals name what is not supported."""

import time

import pytest
import torch
import torch.distributed as dist

from dist_rec import EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.distributed import ProcessGroups
from dist_rec.optim import MomentumScaledRowWiseAdagrad, RowWiseAdagrad
from dist_rec.sharding import ShardedEmbeddingBagCollection, uniform_plan
from dist_rec.sync.embeddings import EmbeddingReplicaSync
from dist_rec.testing.multi_process import run_multi_process

TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=6, num_embeddings=23, feature_names=["f0"]),
    EmbeddingBagConfig(name="t1", embedding_dim=6, num_embeddings=40, feature_names=["f1"]),
]


def _collection(groups, optimizer=None):
    plan = uniform_plan(TABLES, "row_wise", groups.grid.group_size, local_world_size=groups.grid.group_size)
    return ShardedEmbeddingBagCollection(TABLES, plan, optimizer or RowWiseAdagrad(lr=0.1, eps=1e-3), process_groups=groups)


def _blocks(sharded):
    out = []
    for local in sharded.local_shards():
        weight, state = local.read()
        out += [weight.clone(), *[state[k].clone() for k in sorted(state)]]
    return out


def _my_replica_group(groups):
    """A plain group of this rank's replicas (every rank makes every one, in order)."""
    made = [dist.new_group(list(ranks)) for ranks in groups.grid.replica_groups]
    return made[groups.grid.replica_groups.index(groups.grid.my_replica_group)]


def _replica_mean(blocks, group):
    mean = []
    for t in blocks:
        wire = t.clone()
        dist.all_reduce(wire, group=group)
        mean.append(wire / dist.get_world_size(group))
    return mean


def _rank_paused(rank, world_size):
    groups = ProcessGroups(replicas=2, layout="shards_on_host")
    sharded = _collection(groups)
    with torch.no_grad():  # the replicas drift apart (as if each group had trained alone)
        for local in sharded.local_shards():
            weight, state = local.read()
            weight.add_(0.1 * (groups.grid.replica_index + 1))
            for t in state.values():
                t.add_(0.01 * (rank + 1))
    replica_group = _my_replica_group(groups)
    expected = _replica_mean(_blocks(sharded), replica_group)
    sync = EmbeddingReplicaSync({"ebc": sharded}, groups)
    sync.start()
    time.sleep(0.05)
    sync.sync.stop(timeout_s=30)
    assert sync.sync.rounds >= 1
    for got, want in zip(_blocks(sharded), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_background_rounds_with_training_paused_leave_every_copy_at_the_replicas_mean():
    run_multi_process(_rank_paused, world_size=4)


def _rank_update_during_round(rank, world_size):
    groups = ProcessGroups(replicas=2, layout="shards_on_host")
    sharded = _collection(groups)
    sync = EmbeddingReplicaSync({"ebc": sharded}, groups)
    g = torch.Generator().manual_seed(rank)
    kjt = KeyedJaggedTensor(["f0", "f1"], torch.tensor([1, 20, 3, 30]), lengths=torch.tensor([1, 1, 1, 1]))  # rows of both halves
    before = {}

    def a_training_step(round_index, copy):  # a fused update lands between a round's copy and its add
        if round_index == 0:
            before["blocks"] = _blocks(sharded)
            sharded(kjt).values().backward(torch.randn(2, 12, generator=g))
            before["stepped"] = [after - b for after, b in zip(_blocks(sharded), before["blocks"])]

    sync.sync.between = a_training_step
    replica_group = _my_replica_group(groups)
    sync.start()
    time.sleep(0.05)
    sync.sync.stop(timeout_s=60)
    assert sync.sync.rounds >= 1 and any(bool(d.abs().sum() > 0) for d in before["stepped"])
    # The first round added mean(copies) - copy to the stepped rows: the step stays on top of the mean; the
    # later rounds (no more steps) average the replicas, so every copy ends at the mean of (mean + own step).
    first_mean = _replica_mean(before["blocks"], replica_group)
    expected = _replica_mean([m + d for m, d in zip(first_mean, before["stepped"])], replica_group)
    got = _blocks(sharded)
    if sync.sync.rounds == 1:
        expected = [m + d for m, d in zip(first_mean, before["stepped"])]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_fused_update_made_during_a_round_is_kept():
    run_multi_process(_rank_update_during_round, world_size=4, timeout=180)


def _rank_training(rank, world_size):
    groups = ProcessGroups(replicas=2, layout="shards_on_host")
    sharded = _collection(groups)
    sync = EmbeddingReplicaSync({"ebc": sharded}, groups)
    g = torch.Generator().manual_seed(rank)
    sync.start()
    for step in range(40):  # each rank trains its own ids (repeated ids too) while rounds run
        ids = torch.cat([torch.randint(0, 6, (3,), generator=g), torch.randint(20, 40, (3,), generator=g)])
        kjt = KeyedJaggedTensor(["f0", "f1"], ids % torch.tensor([23, 23, 23, 40, 40, 40]), lengths=torch.tensor([2, 1, 2, 1]))
        sharded(kjt).values().backward(torch.randn(2, 12, generator=g))
        time.sleep(0.002 * (rank % 2))
    sync.sync.stop(timeout_s=60)
    rounds, moved = sync.sync.rounds, sync.rows.rows_moved
    all_rows = sum(local.shard.num_rows for local in sharded.local_shards())
    assert rounds >= 2 and moved < rounds * all_rows  # after the first round, only the touched rows moved
    # One more round, of the touched rows only, with training paused: every row of every copy lands on the
    # replicas' mean, so the rows left out of the rounds were equal on every replica.
    expected = _replica_mean(_blocks(sharded), _my_replica_group(groups))
    sync.sync.run_round(groups.copies_subgroup("embedding_sync"))
    for got, want in zip(_blocks(sharded), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_rounds_of_touched_rows_leave_no_row_apart():
    run_multi_process(_rank_training, world_size=4, timeout=180)


def _rank_idle_rounds(rank, world_size):
    groups = ProcessGroups(replicas=2, layout="shards_on_host")
    sync = EmbeddingReplicaSync({"ebc": _collection(groups)}, groups)
    sync.start()
    time.sleep(0.1)
    sync.sync.stop(timeout_s=30)
    all_rows = sum(local.shard.num_rows for local in sync.rows.shards)
    assert sync.sync.rounds >= 2 and sync.rows.rows_moved == all_rows  # the first round: every row; then none


def test_with_nothing_touched_only_the_first_round_moves_rows():
    run_multi_process(_rank_idle_rounds, world_size=4)


def _rank_refused(rank, world_size):
    groups = ProcessGroups(replicas=2, layout="shards_on_host")
    sharded = _collection(groups, MomentumScaledRowWiseAdagrad(lr=0.1, eps=1e-3, momentum_scale=1.5))
    with pytest.raises(ValueError, match="momentum-scaled row-wise AdaGrad"):
        EmbeddingReplicaSync({"ebc": sharded}, groups)


def test_momentum_scaled_optimizer_is_refused_by_name():
    run_multi_process(_rank_refused, world_size=4)
