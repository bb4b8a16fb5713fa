"""``first_id_out_of_range`` against its tensor-op reference: random
batches (empty features, repeated ids, int32 and int64 ids, bad ids in the
first, last and middle positions, negative ids, tables past int32's range),
and clear errors for inconsistent arguments."""

import pytest
import torch

from dist_rec.ops.id_range import first_id_out_of_range, first_id_out_of_range_reference


def _batch(seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    features = int(torch.randint(1, 6, (1,), generator=g))
    limits = torch.randint(1, 3000, (features,), generator=g)
    counts = torch.randint(0, 2500, (features,), generator=g)
    counts[torch.rand(features, generator=g) < 0.2] = 0  # features without ids
    ids = torch.cat([torch.randint(0, int(limit), (int(n),), generator=g) for limit, n in zip(limits, counts)])
    return ids.to(dtype), counts, limits, g


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("seed", range(12))
def test_the_first_bad_id_as_the_reference_finds_it(seed, dtype):
    ids, counts, limits, g = _batch(seed, dtype)
    assert first_id_out_of_range(ids, counts, limits) == first_id_out_of_range_reference(ids, counts, limits) == -1
    if ids.numel() == 0:
        return
    starts = torch.cumsum(counts, 0) - counts
    for _ in range(4):
        bad = ids.clone()
        positions = torch.randint(0, ids.numel(), (int(torch.randint(1, 3, (1,), generator=g)),), generator=g)
        for position in positions.tolist():
            f = int(torch.searchsorted(starts + counts, torch.tensor(position), right=True))
            bad[position] = -1 if position % 2 else int(limits[f]) + position % 5  # just past the table, or negative
        expected = first_id_out_of_range_reference(bad, counts, limits)
        assert expected == int(positions.min())
        assert first_id_out_of_range(bad, counts, limits) == expected


def test_edges_of_the_range_and_huge_tables():
    limits = torch.tensor([5, 2**40])
    counts = torch.tensor([3, 3])
    ok = torch.tensor([0, 4, 4, 0, 2**39, 2**40 - 1])
    assert first_id_out_of_range(ok, counts, limits) == -1
    assert first_id_out_of_range(torch.tensor([0, 5, 4, 0, 1, 1]), counts, limits) == 1
    assert first_id_out_of_range(torch.tensor([0, 4, 4, 0, 1, 2**40]), counts, limits) == 5
    # int32 ids against a table past int32's range: only negative ids are bad.
    assert first_id_out_of_range(torch.tensor([1, 2, 3, 2**31 - 1], dtype=torch.int32), torch.tensor([0, 4]), limits) == -1
    assert first_id_out_of_range(torch.tensor([1, 2, 3, -7], dtype=torch.int32), torch.tensor([0, 4]), limits) == 3
    assert first_id_out_of_range(torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0]), limits) == -1
    # int32 ids at int32's edge: a table of 2^31 - 1 rows refuses id 2^31 - 1, one of 2^31 rows takes it.
    edge = torch.tensor([2**31 - 1], dtype=torch.int32)
    assert first_id_out_of_range(edge, torch.tensor([1]), torch.tensor([2**31 - 1])) == 0
    assert first_id_out_of_range(edge, torch.tensor([1]), torch.tensor([2**31])) == -1
    assert first_id_out_of_range(torch.tensor([0]), torch.tensor([1]), torch.tensor([0])) == 0  # an empty table
    # int32 limits and other devices' path (the reference) give the same answers.
    assert first_id_out_of_range(torch.tensor([0, 5, 1]), torch.tensor([3]), torch.tensor([5], dtype=torch.int32)) == 1
    assert first_id_out_of_range_reference(torch.tensor([0, 5, 1]), torch.tensor([3]), torch.tensor([5])) == 1


def test_inconsistent_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="counts sum to 3 but there are 4 ids"):
        torch.ops.dist_rec.first_id_out_of_range(torch.arange(4), torch.tensor([3]), torch.tensor([10]))
    with pytest.raises(ValueError, match="one value per feature"):
        torch.ops.dist_rec.first_id_out_of_range(torch.arange(4), torch.tensor([4]), torch.tensor([10, 3]))
    with pytest.raises(ValueError, match="negative id count"):
        torch.ops.dist_rec.first_id_out_of_range(torch.arange(4), torch.tensor([5, -1]), torch.tensor([10, 3]))
    with pytest.raises(ValueError, match="negative row count -1"):
        torch.ops.dist_rec.first_id_out_of_range(torch.arange(4), torch.tensor([4]), torch.tensor([-1]))
    with pytest.raises(TypeError, match="int64 or int32"):
        torch.ops.dist_rec.first_id_out_of_range(torch.arange(4.0), torch.tensor([4]), torch.tensor([10]))
