"""Every kind of bad input gets a clear exception naming what is wrong: the
feature, the table, the offending value and what was expected. Nothing is
updated by a refused call."""

import re
import warnings

import pytest
import torch
import torchrec

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.optim import RowWiseAdagrad

TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0", "f1"]),
    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=5, feature_names=["f2"]),
]
KEYS = ["f0", "f1", "f2"]


@pytest.fixture
def ebc():
    return EmbeddingBagCollection(tables=TABLES, optimizer=RowWiseAdagrad(lr=0.1))


def kjt(values, lengths, keys=KEYS, weights=None, dtype=torch.int64):
    return KeyedJaggedTensor.from_lengths_sync(
        keys, torch.tensor(values, dtype=dtype), torch.tensor(lengths), weights=weights
    )


def assert_refused(ebc, features, error, message):
    before = [b.weight.clone() for b in ebc.embedding_bags.values()]
    with pytest.raises(error, match=re.escape(message)):
        ebc(features)
    for b, w in zip(ebc.embedding_bags.values(), before):
        assert torch.equal(b.weight, w)


def test_id_too_large(ebc):
    # f0: [1], [2]; f1: [3], [10] <- out of t0's range; f2: [0], [1]
    assert_refused(
        ebc,
        kjt([1, 2, 3, 10, 0, 1], [1, 1, 1, 1, 1, 1]),
        IndexError,
        "id 10 at values[3] (feature 'f1', sample 1) is out of range for table 't0' with 10 rows; ids must be in [0, 10)",
    )


def test_negative_id(ebc):
    assert_refused(
        ebc,
        kjt([1, 2, 3, 4, -1, 1], [1, 1, 1, 1, 1, 1]),
        IndexError,
        "id -1 at values[4] (feature 'f2', sample 0) is out of range for table 't1' with 5 rows; ids must be in [0, 5)",
    )


def test_id_too_large_for_the_smaller_shared_table(ebc):
    # 7 is fine for t0 but not for t1.
    assert_refused(ebc, kjt([7, 7, 7, 7, 7, 1], [1, 1, 1, 1, 1, 1]), IndexError, "id 7 at values[4] (feature 'f2', sample 0)")


def test_offsets_not_non_decreasing(ebc):
    features = KeyedJaggedTensor.from_offsets_sync(KEYS, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2, 1, 3, 4, 4, 4]))
    assert_refused(
        ebc,
        features,
        ValueError,
        "Invalid length -1 for feature 'f0' (table 't0'), sample 1: lengths must be >= 0 and offsets non-decreasing.",
    )


def test_offsets_not_ending_at_len_values(ebc):
    features = KeyedJaggedTensor.from_offsets_sync(KEYS, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 3, 3, 3]))
    assert_refused(ebc, features, ValueError, "offsets must end at len(values)=4; offsets[-1]=3")


def test_negative_length(ebc):
    assert_refused(
        ebc,
        kjt([1, 2, 3], [2, 2, -1, 0, 0, 0]),
        ValueError,
        "Invalid length -1 for feature 'f1' (table 't0'), sample 0: lengths must be >= 0 and offsets non-decreasing.",
    )


def test_lengths_count_not_batch_times_features(ebc):
    with pytest.raises(ValueError, match=re.escape("Invalid lengths count 5 for 3 keys ['f0', 'f1', 'f2']. Must be len(keys) x batch size.")):
        kjt([1, 2, 3, 4, 0], [1, 1, 1, 1, 1])
    # TorchRec's KeyedJaggedTensor constructor does not check; the module does.
    features = torchrec.KeyedJaggedTensor(keys=KEYS, values=torch.tensor([1, 2, 3, 4, 0]), lengths=torch.tensor([1, 1, 1, 1, 1]))
    assert_refused(ebc, features, ValueError, "Invalid lengths count 5 for 3 features ['f0', 'f1', 'f2']. Must be number of features x batch size.")


def test_weights_length_differs_from_values():
    ebc = EmbeddingBagCollection(tables=TABLES, is_weighted=True, optimizer=RowWiseAdagrad(lr=0.1))
    features = kjt([1, 2, 3, 4, 0, 1], [1] * 6, weights=torch.rand(5))
    assert_refused(ebc, features, ValueError, "weights must have one weight per value (6); it has 5")


def test_weighted_collection_needs_weights():
    ebc = EmbeddingBagCollection(tables=TABLES, is_weighted=True)
    assert_refused(ebc, kjt([1, 2, 3, 4, 0, 1], [1] * 6), ValueError, "has is_weighted=True but the input has no weights")


def test_float_values(ebc):
    assert_refused(
        ebc,
        kjt([1, 2, 3, 4, 0, 1], [1] * 6, dtype=torch.float32),
        TypeError,
        "Invalid values dtype=torch.float32 for features ['f0', 'f1', 'f2'] (tables ['t0', 't1']). "
        "Must be torch.int32 or torch.int64.",
    )


@pytest.mark.parametrize("given", ["lengths", "offsets"])
def test_float_lengths_or_offsets(ebc, given):
    # Ours and TorchRec's refuse them at construction (tests/sparse); the module checks too, for any
    # object with the accessors (here ours with float bags put in behind its back).
    features = kjt([1, 2, 3, 4, 0, 1], [1] * 6)
    features._lengths, features._offsets = None, None
    setattr(features, f"_{given}", dict(lengths=torch.ones(6), offsets=torch.arange(7.0))[given])
    assert_refused(
        ebc,
        features,
        TypeError,
        f"Invalid {given} dtype=torch.float32 for features ['f0', 'f1', 'f2'] (tables ['t0', 't1']). "
        "Must be an integer dtype (torch.int32 or torch.int64).",
    )


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("where", ["values", "lengths", "weights"])
def test_input_on_another_device_than_the_tables(where, weighted):
    # A meta tensor sent the lookup to the shape-only kernel: uninitialised rows, out-of-range ids unnoticed.
    ebc = EmbeddingBagCollection(tables=TABLES, is_weighted=weighted, optimizer=RowWiseAdagrad(lr=0.1))
    tensors = dict(
        values=torch.tensor([1, 2, 3, 4, 0, 99 if where == "values" else 1]),
        lengths=torch.ones(6, dtype=torch.int64),
        weights=torch.rand(6),
    )
    tensors[where] = tensors[where].to("meta")
    features = KeyedJaggedTensor(KEYS, tensors["values"], lengths=tensors["lengths"], weights=tensors["weights"])
    if where == "weights" and not weighted:
        with pytest.warns(UserWarning, match="they are ignored"):
            ebc(features)  # the weights are not used: their device does not matter
        return
    assert_refused(
        ebc,
        features,
        ValueError,
        f"Invalid {where} device=meta for features ['f0', 'f1', 'f2'] (tables ['t0', 't1']). "
        "Must be cpu, the device of the tables.",
    )


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_weight_names_feature_and_table(fused):
    ebc = EmbeddingBagCollection(tables=TABLES, is_weighted=True, optimizer=RowWiseAdagrad(lr=0.1) if fused else None)
    weights = torch.rand(6)
    weights[4] = float("inf")
    assert_refused(
        ebc,
        kjt([1, 2, 3, 4, 0, 1], [1] * 6, weights=weights),
        ValueError,
        "Invalid per-id weight inf at values[4] (feature 'f2', sample 0) for table 't1'; weights must be finite",
    )


def test_lengths_past_the_values_name_feature_and_table(ebc):
    features = KeyedJaggedTensor.from_offsets_sync(KEYS, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2, 3, 4, 5, 9]))
    assert_refused(
        ebc,
        features,
        ValueError,
        "Invalid length 1 for feature 'f1' (table 't0'), sample 1: its bag ends at 4, past the 3 values; "
        "offsets must end at len(values)=3; offsets[-1]=9.",
    )
    # Fewer ids in the bags than values: the last feature is named.
    features = KeyedJaggedTensor.from_offsets_sync(KEYS, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 3, 3, 3]))
    assert_refused(
        ebc,
        features,
        ValueError,
        "Invalid lengths for feature 'f2' (table 't1'), the last one: the bags end at 3 but there are 4 values; "
        "offsets must end at len(values)=4; offsets[-1]=3.",
    )


@pytest.mark.parametrize("fused", [False, True])
def test_weights_given_to_an_unweighted_collection_warn_once(fused):
    ebc = EmbeddingBagCollection(tables=TABLES, optimizer=RowWiseAdagrad(lr=0.1) if fused else None)
    plain = kjt([1, 2, 3, 4, 0, 1], [1] * 6)
    weighted = kjt([1, 2, 3, 4, 0, 1], [1] * 6, weights=torch.rand(6))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [ebc(weighted).values() for _ in range(2)]
        expected = ebc(plain).values()
    assert [str(w.message) for w in caught] == [
        "EmbeddingBagCollection: the input carries per-id weights for features ['f0', 'f1', 'f2'] "
        "(tables ['t0', 't1']), but this collection was built with is_weighted=False: they are ignored. "
        "Build it with is_weighted=True to pool with them."
    ]
    for out in outputs:
        assert torch.equal(out, expected)


def test_float64_weights():
    ebc = EmbeddingBagCollection(tables=TABLES, is_weighted=True)
    features = kjt([1, 2, 3, 4, 0, 1], [1] * 6, weights=torch.rand(6, dtype=torch.float64))
    assert_refused(ebc, features, TypeError, "weights must have dtype Float; it has Double")


def test_unknown_feature_name(ebc):
    assert_refused(
        ebc,
        kjt([1, 2, 3, 4, 0, 1, 2, 3], [1] * 8, keys=["f0", "f1", "f2", "f9"]),
        ValueError,
        "Unknown feature names ['f9'] in the input. This EmbeddingBagCollection has features ['f0', 'f1', 'f2'] (tables ['t0', 't1']).",
    )


def test_missing_feature(ebc):
    assert_refused(ebc, kjt([1, 2, 3, 4], [1] * 4, keys=["f0", "f2"]), ValueError, "The input lacks features ['f1']; it has keys ['f0', 'f2'].")


def test_bad_configs_are_refused_with_their_names():
    with pytest.raises(ValueError, match=re.escape("Invalid num_embeddings=0 for table 'x'. Must be an int > 0.")):
        EmbeddingBagConfig(name="x", embedding_dim=4, num_embeddings=0, feature_names=["a"])
    with pytest.raises(ValueError, match=re.escape("Duplicate feature name 'f0' in tables 't0' and 't2'.")):
        EmbeddingBagCollection(tables=[*TABLES, EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=3, feature_names=["f0"])])
    with pytest.raises(ValueError, match=re.escape("Duplicate table name 't0'.")):
        EmbeddingBagCollection(tables=[TABLES[0], TABLES[0]])
    with pytest.raises(ValueError, match=re.escape("Invalid pooling='MAX' for table 'x'. Must be one of SUM, MEAN.")):
        EmbeddingBagConfig(name="x", embedding_dim=4, num_embeddings=3, feature_names=["a"], pooling="MAX")


def test_bad_optimizer_settings_are_refused():
    with pytest.raises(ValueError, match=re.escape("Invalid lr=-0.1. Must be >= 0.")):
        RowWiseAdagrad(lr=-0.1)
    with pytest.raises(ValueError, match=re.escape("Invalid eps=0.0. Must be > 0.")):
        RowWiseAdagrad(eps=0.0)
    with pytest.raises(ValueError, match=re.escape("Invalid weight_decay_mode='l1'. Must be 'none', 'l2' or 'decoupled'.")):
        RowWiseAdagrad(weight_decay_mode="l1")
