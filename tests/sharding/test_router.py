"""The batched ``Router`` routes every id exactly as the per-feature rule
of its sharding type (``ShardingScheme.route``): same bag lengths, ids and
weights for every slot, on random plans and batches (empty bags, repeated
ids, features not routed at all)."""

import pytest
import torch

from dist_rec.sharding.plan import table_sharding
from dist_rec.sharding.router import Router, payload
from dist_rec.sharding.sharded_ebc import SCHEMES

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
