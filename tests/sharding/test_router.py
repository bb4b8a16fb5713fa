"""The batched ``Router`` routes every id exactly as the per-feature rule
of its sharding type (``ShardingScheme.route``): same bag lengths, ids and
weights for every slot, on random plans and batches (empty bags, repeated
ids, features not routed at all)."""

import pytest
import torch

from dist_rec.planner.plan import table_sharding
from dist_rec.sharding.router import Router, payload
from dist_rec.sharding.schemes import SCHEMES

TYPES = ["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    world = int(torch.randint(1, 5, (1,), generator=g))
    features = []  # (rows, sharding)
    for f in range(int(torch.randint(1, 7, (1,), generator=g))):
        rows = int(torch.randint(1, 50, (1,), generator=g))
        kind = TYPES[int(torch.randint(0, len(TYPES), (1,), generator=g))]
        ranks = torch.randperm(world, generator=g)[: int(torch.randint(1, world + 1, (1,), generator=g))].tolist()
        features.append((rows, table_sharding(f"t{f}", rows, 4, kind, ranks)))
    batch = int(torch.randint(0, 6, (1,), generator=g))
    lengths = torch.randint(0, 4, (len(features), batch), generator=g)
    ids = torch.cat([torch.randint(0, rows, (int(lengths[f].sum()),), generator=g) for f, (rows, _) in enumerate(features)])
    weights = torch.rand(ids.numel(), generator=g)
    return world, features, lengths, ids, weights


@pytest.mark.parametrize("seed", range(40))
def test_router_matches_the_per_feature_rule(seed):
    world, features, lengths, ids, weights = _case(seed)
    # Slots destination-major, as ShardedEmbeddingBagCollection numbers them.
    by_rank = [[] for _ in range(world)]
    for f, (_, sharding) in enumerate(features):
        shards = sorted(sharding.shards, key=lambda s: (s.row_offset, s.col_offset))
        for k, shard in enumerate(shards):
            by_rank[shard.rank].append((f, k))
    index = {slot: i for i, slot in enumerate(s for slots in by_rank for s in slots)}
    slot_of, offsets, bucketed = [], [], []
    for f, (_, sharding) in enumerate(features):
        shards = sorted(sharding.shards, key=lambda s: (s.row_offset, s.col_offset))
        slot_of.append([index[(f, k)] for k in range(len(shards))])
        offsets.append([s.row_offset for s in shards])
        bucketed.append(bool(shards) and SCHEMES[sharding.sharding_type].bucketed)
    router = Router(slot_of, offsets, bucketed, [len(s) for s in by_rank], "cpu")
    routed = router.route(lengths, ids, weights)

    expected = {}
    per_feature = torch.split(ids, lengths.sum(dim=1).tolist())
    per_feature_weights = torch.split(weights, lengths.sum(dim=1).tolist())
    for f, (_, sharding) in enumerate(features):
        if sharding.sharding_type == "data_parallel":
            continue
        shards = sorted(sharding.shards, key=lambda s: (s.row_offset, s.col_offset))
        for k, part in enumerate(SCHEMES[sharding.sharding_type].route(shards, lengths[f], per_feature[f], per_feature_weights[f])):
            expected[index[(f, k)]] = part
    starts = torch.cumsum(routed.lengths.sum(dim=1), 0) - routed.lengths.sum(dim=1)
    for slot, (slot_lengths, slot_ids, slot_weights) in expected.items():
        assert torch.equal(routed.lengths[slot], slot_lengths)
        n = int(slot_lengths.sum())
        start = int(starts[slot])
        assert torch.equal(routed.ids[start : start + n], slot_ids)
        assert torch.equal(routed.weights[start : start + n], slot_weights)
    assert routed.ids.numel() == sum(int(p[0].sum()) for p in expected.values())
    assert sum(routed.ids_per_rank) == routed.ids.numel()
    # The payload interleaves each rank's lengths and ids.
    buffer = payload(routed, [len(s) for s in by_rank])
    assert buffer.numel() == routed.lengths.numel() + routed.ids.numel()


def _row_wise_router(seed: int):
    """A router over row-wise features only (different shard counts and
    sizes) and a batch for it with empty bags and repeated ids."""
    g = torch.Generator().manual_seed(seed)
    world = int(torch.randint(1, 5, (1,), generator=g))
    slot_of, offsets, rows, next_slot = [], [], [], 0
    for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
        shards = int(torch.randint(1, world + 1, (1,), generator=g))
        table_rows = int(torch.randint(shards, 300, (1,), generator=g))
        cuts = sorted(torch.randperm(table_rows - 1, generator=g)[: shards - 1].add(1).tolist())
        offsets.append([0] + cuts)
        slot_of.append(list(range(next_slot, next_slot + shards)))
        next_slot += shards
        rows.append(table_rows)
    router = Router(slot_of, offsets, [True] * len(rows), [next_slot], "cpu")
    batch = int(torch.randint(0, 40, (1,), generator=g))
    lengths = torch.randint(0, 25, (len(rows), batch), generator=g) * (torch.rand(len(rows), batch, generator=g) > 0.2)
    ids = torch.cat([torch.randint(0, r, (int(lengths[f].sum()),), generator=g) for f, r in enumerate(rows)])
    return router, lengths, ids


@pytest.mark.parametrize("seed", range(12))
def test_native_bucketize_matches_its_tensor_op_form(seed):
    router, lengths, ids = _row_wise_router(seed)
    batch = lengths.shape[1]
    local, per_slot, order = torch.ops.dist_rec.bucketize_by_rows(ids, lengths, router.bounds, router.slot_table_2d, router.num_slots, True)
    ref_local, ref_per_slot, ref_order = router._bucketise_with_tensor_ops(ids, lengths, batch)
    assert torch.equal(local, ref_local)
    assert torch.equal(per_slot, ref_per_slot)
    assert torch.equal(order, ref_order)
    # Without weights no order is produced; the routing is the same.
    weighted = router.route(lengths, ids, torch.rand(ids.numel()))
    plain = router.route(lengths, ids, None)
    assert plain.weights is None
    assert torch.equal(plain.ids, weighted.ids) and torch.equal(plain.lengths, weighted.lengths)


def test_native_bucketize_refuses_bad_input():
    router, lengths, ids = _row_wise_router(3)
    op = torch.ops.dist_rec.bucketize_by_rows
    args = (router.bounds, router.slot_table_2d, router.num_slots, False)
    with pytest.raises(ValueError, match="lengths sum to"):
        op(ids[:-1], lengths, *args)
    bad = ids.clone()
    bad[-1] = -5
    with pytest.raises(IndexError, match="id -5 at position"):
        op(bad, lengths, *args)
    with pytest.raises(TypeError, match="int64|Long"):
        op(ids.int(), lengths, *args)
    with pytest.raises(IndexError, match="slot_table holds slot"):
        op(ids, lengths, router.bounds, router.slot_table_2d, 0, False)


def test_native_bucketize_with_many_row_blocks():
    """Over 16 blocks the native op binary-searches the block starts."""
    g = torch.Generator().manual_seed(5)
    starts = [0] + sorted(torch.randperm(999, generator=g)[:23].add(1).tolist())
    router = Router([list(range(24)), list(range(24, 26))], [starts, [0, 7]], [True, True], [26], "cpu")
    lengths = torch.randint(0, 9, (2, 30), generator=g)
    ids = torch.cat([torch.randint(0, 1000, (int(lengths[0].sum()),), generator=g), torch.randint(0, 12, (int(lengths[1].sum()),), generator=g)])
    local, per_slot, order = torch.ops.dist_rec.bucketize_by_rows(ids, lengths, router.bounds, router.slot_table_2d, router.num_slots, True)
    ref_local, ref_per_slot, ref_order = router._bucketise_with_tensor_ops(ids, lengths, 30)
    assert torch.equal(local, ref_local) and torch.equal(per_slot, ref_per_slot) and torch.equal(order, ref_order)


@pytest.mark.parametrize("with_order", [False, True])
def test_native_bucketize_passes_opcheck(with_order):
    router, lengths, ids = _row_wise_router(7)
    args = (ids, lengths, router.bounds, router.slot_table_2d, router.num_slots, with_order)
    torch.library.opcheck(torch.ops.dist_rec.bucketize_by_rows.default, args)
