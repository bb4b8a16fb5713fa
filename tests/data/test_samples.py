"""Sample rows, the rank split of a stream of them, and the held-out split."""

import numpy as np
import pytest
import torch

from dist_rec.data.samples import HeldOutSplit, RankBlocks, SampleRows, held_out
from dist_rec.data.schema import Schema
from dist_rec.data.tabular import TextDataset
from dist_rec.testing import tables


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 3, size=(n, 2))
    values = rng.integers(0, 100, size=int(lengths.sum()))
    return SampleRows.build(np.arange(n), rng.random((n, 1)), lengths, values, rng.random(len(values)))


def test_take_slice_concat_and_batches_round_trip():
    rows = _rows(50)
    index = np.array([4, 0, 49, 4, 17])
    taken = rows.take(index)
    assert taken.labels.tolist() == [4, 0, 49, 4, 17]
    for k, i in enumerate(index):
        a, b = rows.offsets[i], rows.offsets[i + 1]
        assert taken.values[taken.offsets[k] : taken.offsets[k + 1]].tolist() == rows.values[a:b].tolist()
    joined = SampleRows.concat([rows.slice(0, 20), rows.slice(20, 50)])
    for name in ("labels", "dense", "lengths", "offsets", "values", "weights"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(rows, name))
    back = SampleRows.from_batch(rows.to_batch(["a", "b"]))
    for name in ("labels", "lengths", "values", "weights"):
        np.testing.assert_allclose(getattr(back, name), getattr(rows, name), rtol=1e-6)


@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_blocks_deal_global_batches_as_the_binary_split_does(drop_last):
    from dist_rec.data.batch import rank_block_ranges

    rows = _rows(103)
    chunks = [rows.slice(a, min(a + 17, 103)) for a in range(0, 103, 17)]
    for rank in range(3):
        got = [b.labels.tolist() for b in RankBlocks(10, rank, 3, drop_last, start_step=1)(iter(chunks))]
        expected = [list(range(a, b)) for a, b in rank_block_ranges(103, 10, rank, 3, drop_last, start_step=1)]
        assert got == expected


def test_held_out_is_a_fixed_fraction_and_independent_of_chunking():
    mask = held_out(np.arange(100_000), 0.1, seed=3)
    assert abs(mask.mean() - 0.1) < 0.005
    np.testing.assert_array_equal(mask[500:900], held_out(np.arange(500, 900), 0.1, seed=3))
    assert not np.array_equal(mask, held_out(np.arange(100_000), 0.1, seed=4))


def test_the_two_parts_of_a_split_are_disjoint_and_cover_the_stream(tmp_path):
    path = tables.write_lines(tmp_path / "a.csv", tables.avazu_lines(500))
    dataset = TextDataset([path], Schema.from_dict(tables.AVAZU_SCHEMA))
    everything = torch.cat([b.dense_features for b in dataset.batches(500, drop_last=False)])
    parts = {}
    for part in ("train", "eval"):
        split = HeldOutSplit(dataset, 0.2, seed=1, part=part)
        parts[part] = [torch.cat([b.dense_features for b in split.batches(7, r, 3, drop_last=False)]) for r in range(3)]
    train, test = torch.cat(parts["train"]), torch.cat(parts["eval"])
    assert len(train) + len(test) == 500 and 60 < len(test) < 140
    mask = torch.from_numpy(held_out(np.arange(500), 0.2, seed=1))
    assert sorted(map(tuple, test.tolist())) == sorted(map(tuple, everything[mask].tolist()))
    assert sorted(map(tuple, train.tolist())) == sorted(map(tuple, everything[~mask].tolist()))
    assert split.sparse_feature_names == dataset.sparse_feature_names  # the names of what it splits
    with pytest.raises(TypeError):
        len(split)  # a part's length is unknown until read
