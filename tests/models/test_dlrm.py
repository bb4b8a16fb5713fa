"""DLRM against a loop-simple reference of its forward, and with TorchRec's
collection in place of ours."""

import pytest
import torch

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.models import DLRM, DLRM_DCN, InteractionArch, LowRankCrossNet
from dist_rec.optim import RowWiseAdagrad


def interaction_by_loops(dense, sparse):
    batch, num_features, _ = sparse.shape
    rows = []
    for b in range(batch):
        vectors = [dense[b]] + [sparse[b, f] for f in range(num_features)]
        dots = [torch.dot(vectors[i], vectors[j]) for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
        rows.append(torch.cat([dense[b], torch.stack(dots)]))
    return torch.stack(rows)


@pytest.mark.parametrize("batch,num_features,dim", [(1, 1, 3), (5, 4, 8), (0, 3, 2)])
def test_interaction_matches_loops(batch, num_features, dim):
    g = torch.Generator().manual_seed(batch + num_features)
    dense = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    sparse = torch.randn(batch, num_features, dim, generator=g, dtype=torch.float64)
    arch = InteractionArch(num_features)
    out = arch(dense, sparse)
    assert out.shape == (batch, arch.output_features(dim))
    if batch:
        torch.testing.assert_close(out, interaction_by_loops(dense, sparse))


def _tables(dim=4):
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=dim, num_embeddings=10, feature_names=["a", "b"]),
        EmbeddingBagConfig(name="t1", embedding_dim=dim, num_embeddings=5, feature_names=["c"]),
    ]


def _kjt():
    return KeyedJaggedTensor(["a", "b", "c"], torch.tensor([1, 2, 3, 4, 0, 4]), lengths=torch.tensor([2, 0, 1, 1, 1, 1]))


def test_dlrm_forward_matches_its_parts_and_trains():
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=_tables(), optimizer=RowWiseAdagrad(lr=0.1))
    model = DLRM(ebc, dense_in_features=3, dense_arch_layer_sizes=[6, 4], over_arch_layer_sizes=[5, 1])
    dense = torch.randn(2, 3)
    logits = model(dense, _kjt())
    assert logits.shape == (2, 1)
    d = model.dense_arch(dense)
    pooled = ebc(_kjt()).values().reshape(2, 3, 4)
    expected = model.over_arch(interaction_by_loops(d, pooled))
    torch.testing.assert_close(logits, expected)
    before = ebc.state_dict()["embedding_bags.t0.weight"].clone()
    logits.sum().backward()
    assert not torch.equal(before, ebc.state_dict()["embedding_bags.t0.weight"])  # fused update ran
    assert model.dense_arch.model[0].weight.grad is not None


def test_dlrm_refuses_tables_of_another_width():
    ebc = EmbeddingBagCollection(tables=_tables(dim=8))
    with pytest.raises(ValueError, match=r"Table 't0' has embedding_dim=8; .* dense_arch_layer_sizes\[-1\]=4"):
        DLRM(ebc, dense_in_features=3, dense_arch_layer_sizes=[6, 4], over_arch_layer_sizes=[1])


def test_dlrm_with_torchrec_collection_matches_ours():
    import torchrec  # a test dependency (requirements-interop.txt): its absence must fail, not skip
    ours = EmbeddingBagCollection(tables=_tables())
    theirs = torchrec.EmbeddingBagCollection(
        tables=[torchrec.EmbeddingBagConfig(name=c.name, embedding_dim=4, num_embeddings=c.num_embeddings,
                                            feature_names=c.feature_names) for c in _tables()]
    )
    theirs.load_state_dict(ours.state_dict())
    torch.manual_seed(1)
    a = DLRM(ours, 3, [6, 4], [5, 1])
    torch.manual_seed(1)
    b = DLRM(theirs, 3, [6, 4], [5, 1])
    dense = torch.randn(2, 3)
    kjt = torchrec.KeyedJaggedTensor(keys=["a", "b", "c"], values=_kjt().values(), lengths=_kjt().lengths())
    torch.testing.assert_close(a(dense, kjt), b(dense, kjt))


def crossnet_by_formula(net, x0):
    x = x0
    for down, up in zip(net.down, net.up):
        w = up.weight @ down.weight  # the low-rank weight, formed explicitly
        x = x0 * (x @ w.T + up.bias) + x
    return x


@pytest.mark.parametrize("layers,rank", [(1, 2), (3, 4)])
def test_low_rank_crossnet_matches_its_formula(layers, rank):
    torch.manual_seed(layers)
    net = LowRankCrossNet(6, layers, rank).double()
    x0 = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(net(x0), crossnet_by_formula(net, x0))


def test_dlrm_dcn_forward_and_training():
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=_tables(), optimizer=RowWiseAdagrad(lr=0.1))
    model = DLRM_DCN(ebc, 3, [6, 4], [5, 1], dcn_num_layers=2, dcn_low_rank=3)
    dense = torch.randn(2, 3)
    logits = model(dense, _kjt())
    assert logits.shape == (2, 1)
    x0 = torch.cat([model.dense_arch(dense), ebc(_kjt()).values()], dim=1)  # [B, 4 * (3 + 1)]
    torch.testing.assert_close(logits, model.over_arch(crossnet_by_formula(model.inter_arch.crossnet, x0)))
    logits.sum().backward()
    assert model.inter_arch.crossnet.down[0].weight.grad is not None


class _GroupedByRank(torch.nn.Module):
    """A collection that returns its features in another order, as a sharded
    TorchRec collection does (grouped by the rank that pooled them)."""

    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def embedding_bag_configs(self):
        return self.ebc.embedding_bag_configs()

    def forward(self, kjt):
        from dist_rec.sparse.jagged_tensor import KeyedTensor

        out = self.ebc(kjt)
        keys = list(out.keys())
        columns = dict(zip(keys, torch.split(out.values(), list(out.length_per_key()), dim=1)))
        order = keys[::-1]
        return KeyedTensor(order, [columns[k].shape[1] for k in order], torch.cat([columns[k] for k in order], dim=1))


def test_dlrm_reads_pooled_features_by_key_not_position():
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=_tables(), optimizer=RowWiseAdagrad(lr=0.1))
    model = DLRM(ebc, dense_in_features=3, dense_arch_layer_sizes=[6, 4], over_arch_layer_sizes=[5, 1])
    dense = torch.randn(2, 3)
    expected = model(dense, _kjt())
    model.sparse_arch = _GroupedByRank(ebc)
    torch.testing.assert_close(model(dense, _kjt()), expected)
