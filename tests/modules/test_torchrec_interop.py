"""Drop-in with TorchRec: its configs and KeyedJaggedTensor are accepted as
they are, and a model gives TorchRec's numbers for the same weights."""

import pytest
import torch
import torchrec

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.optim import RowWiseAdagrad

TORCHREC_TABLES = [
    torchrec.EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=40, feature_names=["f0", "f1"]),
    torchrec.EmbeddingBagConfig(
        name="t1", embedding_dim=4, num_embeddings=25, feature_names=["f2"], pooling=torchrec.PoolingType.MEAN
    ),
]


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (3 * 5,), generator=g)
    n = [int(lengths[i * 5 : (i + 1) * 5].sum()) for i in range(3)]
    values = torch.cat([torch.randint(0, rows, (k,), generator=g) for rows, k in zip([40, 40, 25], n)])
    return values, lengths


def test_torchrec_configs_and_kjt_give_torchrecs_output():
    ours = EmbeddingBagCollection(tables=TORCHREC_TABLES)
    theirs = torchrec.EmbeddingBagCollection(tables=TORCHREC_TABLES)
    theirs.load_state_dict(ours.state_dict())  # same keys: embedding_bags.<table>.weight
    values, lengths = _batch(0)
    torchrec_kjt = torchrec.KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2"], values, lengths)
    expected = theirs(torchrec_kjt)
    got = ours(torchrec_kjt)
    assert got.keys() == expected.keys()
    torch.testing.assert_close(got.values(), expected.values())
    ours_kjt = KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2"], values, lengths)
    torch.testing.assert_close(ours(ours_kjt).values(), expected.values())


def test_torchrec_kjt_with_int32_lengths_trains():
    ebc = EmbeddingBagCollection(tables=TORCHREC_TABLES, optimizer=RowWiseAdagrad(lr=0.1))
    values, lengths = _batch(1)
    kjt = torchrec.KeyedJaggedTensor.from_lengths_sync(["f2", "f0", "f1"], values.clamp(max=24), lengths.int())
    before = ebc.embedding_bags["t1"].weight.clone()
    out = ebc(kjt)
    out.values().sum().backward()
    assert not torch.equal(before, ebc.embedding_bags["t1"].weight)


def test_torchrec_config_converts_field_by_field():
    ebc = EmbeddingBagCollection(tables=TORCHREC_TABLES)
    configs = ebc.embedding_bag_configs()
    assert all(isinstance(c, EmbeddingBagConfig) for c in configs)
    assert [(c.name, c.embedding_dim, c.num_embeddings, c.feature_names, c.pooling.value) for c in configs] == [
        ("t0", 8, 40, ["f0", "f1"], "SUM"),
        ("t1", 4, 25, ["f2"], "MEAN"),
    ]


def test_variable_batch_per_feature_is_refused_not_misread():
    ebc = EmbeddingBagCollection(tables=TORCHREC_TABLES)
    kjt = torchrec.KeyedJaggedTensor(
        keys=["f0", "f1", "f2"],
        values=torch.tensor([1, 2, 3, 4, 5, 6]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1]),
        stride_per_key_per_rank=[[1], [2], [3]],
    )
    with pytest.raises(NotImplementedError, match="different batch size per feature"):
        ebc(kjt)
