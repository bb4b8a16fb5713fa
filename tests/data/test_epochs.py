"""Epochs and shuffling: every sample once per epoch on any world size, a new
order each epoch, the same order for the same seed; resumes land mid-epoch."""

import numpy as np
import pytest
import torch

from dist_rec.data.batch import Batch
from dist_rec.data.binary import BinaryDataset, write_binary_dataset
from dist_rec.data.epochs import EpochStream
from dist_rec.data.schema import Schema
from dist_rec.data.tabular import TextDataset
from dist_rec.sparse.jagged_tensor import KeyedJaggedTensor
from dist_rec.testing import tables

NUM_SAMPLES = 600


@pytest.fixture
def numbered(tmp_path):
    """A binary dataset whose dense feature 0 is the sample's index (and its id is too)."""

    def batches():
        for start in range(0, NUM_SAMPLES, 128):
            index = torch.arange(start, min(start + 128, NUM_SAMPLES))
            kjt = KeyedJaggedTensor(["f"], index % 97, lengths=torch.ones_like(index), stride=len(index))
            yield Batch(index.float()[:, None], kjt, (index % 2).float())

    return write_binary_dataset(tmp_path / "numbered", batches(), ["f"], [97])


def _seen(dataset, epochs, world_size, batch_size=25, start_step=0):
    """Per epoch, the sample indices every rank trained on, step by step."""
    streams = [EpochStream(dataset, epochs, batch_size, rank, world_size, start_step) for rank in range(world_size)]
    order = []
    for step_batches in zip(*streams):
        assert len({s.epoch for s in streams}) == 1
        order.append((streams[0].epoch, torch.cat([b.dense_features[:, 0] for b in step_batches]).long().tolist()))
    assert all(next(s, None) is None and s.exhausted for s in streams)  # every rank ends at the same step
    return order


@pytest.mark.parametrize("world_size", [1, 3])
def test_every_sample_once_per_epoch_and_a_new_order_each_epoch(numbered, world_size):
    dataset = BinaryDataset(numbered, shuffle_seed=7)
    steps = _seen(dataset, 3, world_size)
    per_epoch = NUM_SAMPLES // (25 * world_size)
    assert len(steps) == 3 * per_epoch
    epochs = [[i for e, ids in steps if e == epoch for i in ids] for epoch in range(3)]
    for ids in epochs:
        assert len(ids) == len(set(ids)) == per_epoch * 25 * world_size  # each at most once; the short tail dropped
    if world_size == 1:
        assert all(sorted(ids) == list(range(NUM_SAMPLES)) for ids in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0][:50] != list(range(50))  # shuffled, not file order


def test_the_order_repeats_for_a_seed_and_on_any_world_size(numbered):
    one = [ids for _, ids in _seen(BinaryDataset(numbered, shuffle_seed=7), 2, 1, batch_size=75)]
    three = [ids for _, ids in _seen(BinaryDataset(numbered, shuffle_seed=7), 2, 3, batch_size=25)]
    again = [ids for _, ids in _seen(BinaryDataset(numbered, shuffle_seed=7), 2, 1, batch_size=75)]
    other = [ids for _, ids in _seen(BinaryDataset(numbered, shuffle_seed=8), 2, 1, batch_size=75)]
    assert one == three == again  # 3 ranks x 25 see, step by step, what 1 rank x 75 sees
    assert one != other


def test_without_a_seed_epochs_repeat_the_file_order(numbered):
    steps = _seen(BinaryDataset(numbered), 2, 1, batch_size=100)
    assert [ids for e, ids in steps if e == 0] == [ids for e, ids in steps if e == 1]
    assert steps[0][1] == list(range(100))


@pytest.mark.parametrize("start_step", [0, 5, 6, 13])
def test_a_resume_starts_in_the_right_epoch_at_the_right_batch(numbered, start_step):
    full = _seen(BinaryDataset(numbered, shuffle_seed=3), 3, 2, batch_size=50)
    resumed = _seen(BinaryDataset(numbered, shuffle_seed=3), 3, 2, batch_size=50, start_step=start_step)
    assert resumed == full[start_step:]


@pytest.mark.parametrize("start_step", [0, 4, 9])
def test_a_stream_of_unknown_length_resumes_past_its_first_epoch(tmp_path, start_step):
    path = tables.write_lines(tmp_path / "a.csv", tables.avazu_lines(260))
    dataset = TextDataset([path], Schema.from_dict(tables.AVAZU_SCHEMA))
    full = [b.dense_features for b in EpochStream(dataset, 3, 50, 0, 1)]
    assert len(full) == 15
    resumed = [b.dense_features for b in EpochStream(dataset, 3, 50, 0, 1, start_step)]
    assert len(resumed) == len(full) - start_step
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[start_step:]))


def test_data_too_small_for_one_global_batch_yields_nothing(numbered):
    stream = EpochStream(BinaryDataset(numbered), 5, 400, 0, 2)
    assert list(stream) == [] and stream.exhausted


def test_a_subset_shuffles_within_itself(numbered):
    select = np.arange(0, NUM_SAMPLES, 3)
    ids = [i for _, batch in _seen(BinaryDataset(numbered, shuffle_seed=1, select=select), 1, 1, batch_size=50) for i in batch]
    assert sorted(ids) == select.tolist()
