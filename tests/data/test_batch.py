"""Sample-major storage to a feature-major KeyedJaggedTensor
(dist_rec/data/batch.py) against a plain per-bag reference."""

import numpy as np
import pytest
import torch

from dist_rec.data.batch import concatenated_ranges, kjt_from_sample_major


def _reference(keys, values, lengths, weights=None):
    """Feature 0's bags of every sample, then feature 1's, ..., one bag at a time."""
    starts = np.cumsum(lengths, axis=None).reshape(lengths.shape) - lengths
    out_values, out_weights, out_lengths = [], [], []
    for f in range(lengths.shape[1]):
        for b in range(lengths.shape[0]):
            s, n = starts[b, f], lengths[b, f]
            out_values += list(values[s : s + n])
            out_weights += [] if weights is None else list(weights[s : s + n])
            out_lengths.append(n)
    return out_values, out_weights, out_lengths


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_length", [0, 1, 3])
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (7, 4), (64, 26)])
def test_feature_major_bags_equal_the_reference(seed, max_length, shape):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_length + 1, size=shape)
    if max_length == 1 and shape[0]:
        lengths[0] = 1  # one-hot with and without empty bags
    values = rng.integers(0, 1000, size=int(lengths.sum()))
    weights = rng.random(values.size).astype(np.float32)
    keys = [f"f{i}" for i in range(shape[1])]
    kjt = kjt_from_sample_major(keys, values, lengths, weights)
    expected_values, expected_weights, expected_lengths = _reference(keys, values, lengths, weights)
    assert kjt.values().tolist() == expected_values
    assert kjt.lengths().tolist() == expected_lengths
    assert torch.equal(kjt.weights(), torch.tensor(expected_weights, dtype=torch.float32))


def test_concatenated_ranges():
    starts, lengths = np.array([5, 0, 9, 2]), np.array([2, 0, 3, 1])
    assert concatenated_ranges(starts, lengths).tolist() == [5, 6, 9, 10, 11, 2]
    assert concatenated_ranges(starts, lengths * 0).tolist() == []
