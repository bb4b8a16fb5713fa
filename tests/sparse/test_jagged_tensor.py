"""KeyedJaggedTensor / KeyedTensor behave like TorchRec's."""

import pytest
import torch
import torchrec

from dist_rec import JaggedTensor, KeyedJaggedTensor, KeyedTensor


def make():
    # f0: [1, 2], []; f1: [3], [4, 5]
    return KeyedJaggedTensor.from_lengths_sync(
        ["f0", "f1"], torch.tensor([1, 2, 3, 4, 5]), torch.tensor([2, 0, 1, 2]), weights=torch.arange(5.0)
    )


def test_accessors_agree_with_torchrec():
    ours = make()
    theirs = torchrec.KeyedJaggedTensor.from_lengths_sync(
        ["f0", "f1"], torch.tensor([1, 2, 3, 4, 5]), torch.tensor([2, 0, 1, 2]), weights=torch.arange(5.0)
    )
    assert ours.keys() == theirs.keys()
    assert ours.stride() == theirs.stride() == 2
    assert torch.equal(ours.offsets(), theirs.offsets())
    assert torch.equal(ours.lengths(), theirs.lengths())
    assert ours.length_per_key() == theirs.length_per_key()
    assert ours.offset_per_key() == theirs.offset_per_key()
    for key in ["f0", "f1"]:
        assert torch.equal(ours[key].values(), theirs[key].values())
        assert torch.equal(ours[key].lengths(), theirs[key].lengths())
        assert torch.equal(ours[key].weights(), theirs[key].weights())


def test_to_dict_and_offsets_construction():
    d = make().to_dict()
    assert list(d) == ["f0", "f1"]
    assert [t.tolist() for t in d["f1"].to_dense()] == [[3], [4, 5]]
    from_offsets = KeyedJaggedTensor.from_offsets_sync(["f0", "f1"], torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 2, 3, 5]))
    assert torch.equal(from_offsets.lengths(), torch.tensor([2, 0, 1, 2]))
    assert from_offsets.weights_or_none() is None
    rebuilt = KeyedJaggedTensor.from_jt_dict(d)
    assert torch.equal(rebuilt.values(), make().values()) and torch.equal(rebuilt.weights(), make().weights())


def test_empty_batch():
    kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert kjt.stride() == 0 and kjt.length_per_key() == [0, 0]
    assert kjt.offsets().tolist() == [0]


def test_constructor_arguments_are_keyword_only_and_checked():
    with pytest.raises(TypeError):
        KeyedJaggedTensor(["f0"], torch.tensor([1]), torch.tensor([1]))  # lengths must be named
    with pytest.raises(ValueError, match="Must be unique feature names"):
        KeyedJaggedTensor(["f0", "f0"], torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="needs lengths or offsets"):
        KeyedJaggedTensor(["f0"], torch.tensor([1]))
    with pytest.raises(ValueError, match=r"Must be len\(keys\) x stride = 2 x 2 = 4"):
        KeyedJaggedTensor(["f0", "f1"], torch.tensor([1]), lengths=torch.tensor([1, 0, 0]), stride=2)
    with pytest.raises(KeyError, match="Unknown feature 'zz'"):
        make()["zz"]
    with pytest.raises(ValueError, match="no weights"):
        KeyedJaggedTensor(["f0"], torch.tensor([1]), lengths=torch.tensor([1])).weights()


def test_keyed_tensor():
    kt = KeyedTensor(["a", "b"], [2, 3], torch.arange(10.0).view(2, 5))
    assert kt.offset_per_key() == [0, 2, 5]
    assert torch.equal(kt["b"], torch.tensor([[2.0, 3.0, 4.0], [7.0, 8.0, 9.0]]))
    assert list(kt.to_dict()) == ["a", "b"]


def test_jagged_tensor():
    jt = JaggedTensor(torch.tensor([7, 8, 9]), offsets=torch.tensor([0, 1, 3]))
    assert jt.lengths().tolist() == [1, 2]
    assert [t.tolist() for t in jt.to_dense()] == [[7], [8, 9]]


@pytest.mark.parametrize("given", ["lengths", "offsets"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_lengths_or_offsets_are_refused(given, dtype):
    # Float lengths used to be cast to the ids' dtype downstream, a fractional length silently truncated.
    bags = dict(lengths=torch.tensor([1, 1, 1, 0]), offsets=torch.tensor([0, 1, 2, 3, 3]))[given].to(dtype)
    message = rf"Invalid {given} dtype={dtype} for features \['f0', 'f1'\]\. Must be an integer dtype"
    with pytest.raises(TypeError, match=message):
        KeyedJaggedTensor(["f0", "f1"], torch.tensor([1, 2, 3]), **{given: bags})


def test_lengths_and_offsets_as_given():
    kjt = KeyedJaggedTensor(["f0"], torch.tensor([1, 2]), lengths=torch.tensor([2, 0]))
    assert kjt.offsets_or_none() is None and torch.equal(kjt.lengths_or_none(), torch.tensor([2, 0]))
