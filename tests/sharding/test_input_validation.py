"""Bad input to a sharded collection stops every rank, named on the rank
that gave it (``SparseFeaturesDist.validate``).

Each test spawns 2 gloo ranks; rank 1 gives one bad batch to a fresh
collection, rank 0 a good one. Every rank must raise (the agreed verdict:
nothing hangs), rank 1 naming the argument, feature and table, rank 0 the
rank that refused; then both look up a good batch on the same collection
(a refusal must leave nothing cached behind: meta ids used to leave the row
limits on the meta device). Each case runs through the three ways a batch
reaches ``validate``: a row-wise collection's plain forward (refusal flag in
the counts all-to-all), its input dist started ahead (a train pipeline),
and a collection of data-parallel tables alone (one all-reduce).
"""

import warnings

import pytest
import torch

from dist_rec import EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.optim import RowWiseAdagrad
from dist_rec.sharding import ShardedEmbeddingBagCollection, uniform_plan
from dist_rec.testing.multi_process import run_multi_process

TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0", "f1"]),
    EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=8, feature_names=["f2"]),
]
KEYS = ["f0", "f1", "f2"]
ALL = "features ['f0', 'f1', 'f2'] (tables ['t0', 't1'])"
# Batch of 2, feature-major: f0 has 1 and 2 ids, f1 0 and 1, f2 2 and 1.
LENGTHS = [1, 2, 0, 1, 2, 1]
VALUES = [1, 2, 3, 4, 5, 6, 7]


class LooseFeatures:
    """Neither our KeyedJaggedTensor nor TorchRec's: only the accessors."""

    def __init__(self, values, lengths, weights=None):
        self._values, self._lengths, self._weights = values, lengths, weights

    def keys(self):
        return KEYS

    def values(self):
        return self._values

    def lengths(self):
        return self._lengths

    def stride(self):
        return 2

    def weights_or_none(self):
        return self._weights


def _good(weighted: bool, seed: int = 0) -> KeyedJaggedTensor:
    weights = torch.rand(len(VALUES), generator=torch.Generator().manual_seed(seed)) if weighted else None
    return KeyedJaggedTensor(KEYS, torch.tensor(VALUES), lengths=torch.tensor(LENGTHS), weights=weights)


def _weights_with(position: int, value: float) -> torch.Tensor:
    weights = torch.rand(len(VALUES))
    weights[position] = value
    return weights


def _bad(case: str):
    """(features, weighted collection?, error type, parts of rank 1's message)."""
    values, lengths = torch.tensor(VALUES), torch.tensor(LENGTHS)
    if case == "nan_weight":  # values[5]: f2's second id of sample 0
        features = KeyedJaggedTensor(KEYS, values, lengths=lengths, weights=_weights_with(5, float("nan")))
        return features, True, ValueError, ["Invalid per-id weight nan at values[5] (feature 'f2', sample 0) for table 't1'"]
    if case == "inf_weight":  # values[3]: f1's only id, of sample 1
        features = KeyedJaggedTensor(KEYS, values, lengths=lengths, weights=_weights_with(3, float("-inf")))
        return features, True, ValueError, ["Invalid per-id weight -inf at values[3] (feature 'f1', sample 1) for table 't0'"]
    if case in ("meta_values", "meta_lengths", "meta_weights"):
        weights = torch.rand(len(VALUES))
        tensors = {"values": values, "lengths": lengths, "weights": weights}
        name = case[len("meta_") :]
        tensors[name] = tensors[name].to("meta")
        features = KeyedJaggedTensor(KEYS, tensors["values"], lengths=tensors["lengths"], weights=tensors["weights"])
        return features, True, ValueError, [f"Invalid {name} device=meta for {ALL}. Must be cpu, the device of the tables."]
    if case == "meta_offsets":
        offsets = torch.tensor([0, 1, 3, 3, 4, 6, 7], device="meta")
        features = KeyedJaggedTensor(KEYS, values, offsets=offsets)
        return features, False, ValueError, [f"Invalid offsets device=meta for {ALL}. Must be cpu"]
    if case == "meta_values_torchrec":
        import torchrec

        features = torchrec.KeyedJaggedTensor(keys=KEYS, values=values.to("meta"), lengths=lengths)
        return features, False, ValueError, [f"Invalid values device=meta for {ALL}. Must be cpu"]
    if case == "float_lengths":  # used to be truncated to LENGTHS (which match the values) and pooled
        features = LooseFeatures(values, torch.tensor([1.0, 2.5, 0.0, 1.0, 2.0, 1.0]))
        return features, False, TypeError, [f"Invalid lengths dtype=torch.float32 for {ALL}. Must be an integer dtype"]
    if case == "lengths_past_the_values":  # f2's first bag (2 ids) ends at 6 of 5 values
        features = KeyedJaggedTensor(KEYS, values[:5], lengths=lengths)
        return features, False, ValueError, [
            "Invalid length 2 for feature 'f2' (table 't1'), sample 0: its bag ends at 6, past the 5 values; "
            "the lengths add up to 7 ids but there are 5 values."
        ]
    if case == "values_past_the_bags":
        features = KeyedJaggedTensor(KEYS, torch.tensor(VALUES + [0]), lengths=lengths)
        return features, False, ValueError, [
            "Invalid lengths for feature 'f2' (table 't1'), the last one: the bags end at 7 but there are 8 values"
        ]
    if case == "weights_count":
        features = KeyedJaggedTensor(KEYS, values, lengths=lengths, weights=torch.rand(6))
        return features, True, ValueError, [f"Invalid weights for {ALL}: 6 per-id weights for 7 values"]
    raise AssertionError(case)


CASES = [
    "nan_weight",
    "inf_weight",
    "meta_values",
    "meta_lengths",
    "meta_weights",
    "meta_offsets",
    "meta_values_torchrec",
    "float_lengths",
    "lengths_past_the_values",
    "values_past_the_bags",
    "weights_count",
]


def _collection(sharding_type: str, weighted: bool, world_size: int) -> ShardedEmbeddingBagCollection:
    plan = uniform_plan(TABLES, sharding_type, world_size)
    return ShardedEmbeddingBagCollection(TABLES, plan, RowWiseAdagrad(lr=0.1), is_weighted=weighted)


def _refusals_rank(rank, world_size, path, cases):
    sharding_type = "data_parallel" if path == "data_parallel" else "row_wise"
    for case in cases:
        bad, weighted, error_type, expected = _bad(case)
        sharded = _collection(sharding_type, weighted, world_size)
        features = bad if rank == 1 else _good(weighted)
        if path == "ahead":
            sharded.start_input_dist(features)  # refused later, by the forward
        with pytest.raises((error_type, RuntimeError)) as info:
            sharded(features)
        message = str(info.value)
        if rank == 1:
            assert info.type is error_type, f"{case}: {info.type.__name__}: {message}"
            assert all(part in message for part in expected), f"{case}: {message}"
        else:
            assert info.type is RuntimeError and "rank 1 of the sharding group refused its input" in message, (
                f"{case}: {message}"
            )
        # The same collection still takes a good batch (and trains on it) on every rank.
        for step in range(2):
            good = _good(weighted, seed=step)
            if path == "ahead":
                sharded.start_input_dist(good)
            out = sharded(good).values()
            assert out.shape == (2, 4 + 4 + 3) and bool(torch.isfinite(out).all()), case
            out.sum().backward()


@pytest.mark.parametrize("path", ["row_wise", "ahead", "data_parallel"])
def test_bad_input_on_one_rank_stops_every_rank_naming_feature_and_table(path):
    run_multi_process(_refusals_rank, world_size=2, timeout=180, path=path, cases=CASES)


def _ignored_weights_rank(rank, world_size, sharding_type):
    sharded = _collection(sharding_type, False, world_size)
    with torch.no_grad():
        expected = sharded(_good(False)).values()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs = [sharded(_good(rank == 1, seed=step)).values() for step in range(3)]
    ignored = [w for w in caught if "they are ignored" in str(w.message)]
    if rank == 1:
        assert len(ignored) == 1, [str(w.message) for w in caught]
        message = str(ignored[0].message)
        assert f"per-id weights for {ALL}" in message and "is_weighted=False" in message, message
    else:
        assert not ignored, [str(w.message) for w in caught]
    for out in outputs:  # pooled without the weights
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("sharding_type", ["row_wise", "data_parallel"])
def test_weights_given_to_an_unweighted_collection_warn_once(sharding_type):
    run_multi_process(_ignored_weights_rank, world_size=2, timeout=120, sharding_type=sharding_type)
