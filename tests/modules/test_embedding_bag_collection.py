"""EmbeddingBagCollection: TorchRec-shaped API, fused and unfused training."""

import pytest
import torch

from dist_rec import DataType, EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from dist_rec.ops import reference as ref
from dist_rec.optim import MomentumScaledRowWiseAdagrad, RowWiseAdagrad, SGD

TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=50, feature_names=["f0", "f1"]),
    EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=30, feature_names=["f2"], pooling=PoolingType.MEAN),
]
FEATURES = ["f0", "f1", "f2"]
ROWS = {"f0": 50, "f1": 50, "f2": 30}


def random_kjt(seed, keys=FEATURES, batch=6, weighted=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (len(keys) * batch,), generator=g)
    values = torch.cat(
        [
            torch.randint(0, ROWS[k], (int(lengths[f * batch : (f + 1) * batch].sum()),), generator=g)
            for f, k in enumerate(keys)
        ]
    )
    weights = torch.rand(len(values), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=weights)


def expected_pooled(ebc, kjt, weighted=False):
    """Per feature, nn.EmbeddingBag-style pooling of the feature's table, in config order."""
    columns = []
    for config in ebc.embedding_bag_configs():
        weight = ebc.embedding_bags[config.name].weight.detach().double()
        for name in config.feature_names:
            jt = kjt[name]
            pooled = torch.nn.functional.embedding_bag(
                jt.values(),
                weight,
                jt.offsets(),
                mode="sum" if config.pooling == PoolingType.SUM or weighted else "mean",
                per_sample_weights=jt.weights().double() if weighted else None,
                include_last_offset=True,
            )
            if weighted and config.pooling == PoolingType.MEAN:
                pooled = pooled / jt.lengths().clamp(min=1)[:, None]
            columns.append(pooled)
    return torch.cat(columns, dim=1)


def test_api_matches_the_torchrec_shape():
    ebc = EmbeddingBagCollection(tables=TABLES, optimizer=RowWiseAdagrad(lr=0.05, eps=1e-8, weight_decay=0.0, weight_decay_mode="none"))
    out = ebc(random_kjt(0))
    assert out.keys() == FEATURES
    assert out.values().shape == (6, 8 + 8 + 16)
    assert out.length_per_key() == [8, 8, 16]
    assert {k: v.shape for k, v in out.to_dict().items()} == {"f0": (6, 8), "f1": (6, 8), "f2": (6, 16)}
    assert list(ebc.state_dict()) == ["embedding_bags.t0.weight", "embedding_bags.t1.weight"]
    state = ebc.optimizer_state()
    assert list(state) == ["t0", "t1"]
    assert state["t0"]["momentum1"].shape == (50,) and state["t1"]["momentum1"].shape == (30,)
    # Fused tables are not trainable parameters: dense optimizers and DDP skip them.
    assert all(not p.requires_grad for p in ebc.parameters())


@pytest.mark.parametrize("keys", [FEATURES, ["f2", "f0", "f1"]])
def test_forward_matches_embedding_bag_in_any_key_order(keys):
    ebc = EmbeddingBagCollection(tables=TABLES)
    kjt = random_kjt(1, keys=keys)
    torch.testing.assert_close(ebc(kjt).values().double(), expected_pooled(ebc, kjt), atol=1e-6, rtol=1e-6)


def test_weighted_forward_and_per_sample_weight_gradient():
    ebc = EmbeddingBagCollection(tables=TABLES, is_weighted=True, optimizer=SGD(lr=0.0))
    kjt = random_kjt(2, weighted=True)
    kjt.weights().requires_grad_()
    out = ebc(kjt).values()
    torch.testing.assert_close(out.double(), expected_pooled(ebc, kjt, weighted=True), atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    # Reference gradient: autograd through the float64 reference lookup.
    psw = kjt.weights().detach().double().requires_grad_()
    layout = ebc._layout(kjt.keys())
    weights = [b.weight.detach() for b in ebc.embedding_bags.values()]
    ref_out = ref.embedding_bag_forward_ref(weights, *layout, kjt.values(), kjt.offsets(), psw)
    ref_out.backward(grad.double())
    torch.testing.assert_close(kjt.weights().grad.double(), psw.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "optimizer_name, make",
    [
        ("rowwise_adagrad", lambda: RowWiseAdagrad(lr=0.1, eps=1e-8, weight_decay=0.01, weight_decay_mode="l2")),
        ("sgd", lambda: SGD(lr=0.1, weight_decay=0.01, weight_decay_mode="decoupled")),
        ("momentum_scaled_rowwise_adagrad", lambda: MomentumScaledRowWiseAdagrad(lr=0.1, momentum_scale=2.0)),
    ],
)
def test_fused_training_steps_match_reference(optimizer_name, make):
    optimizer = make()
    ebc = EmbeddingBagCollection(tables=TABLES, optimizer=optimizer)
    ref_weights = [b.weight.detach().double().clone() for b in ebc.embedding_bags.values()]
    ref_states = [[torch.zeros(c.num_embeddings, dtype=torch.float64) for c in TABLES] for _ in optimizer.state_names]
    hyper = {"learning_rate": optimizer.lr, "weight_decay": optimizer.weight_decay, "weight_decay_mode": optimizer._decay_mode}
    if optimizer_name != "sgd":
        hyper["eps"] = optimizer.eps
    if optimizer_name == "momentum_scaled_rowwise_adagrad":
        hyper["momentum_scale"] = optimizer.momentum_scale
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        kjt = random_kjt(10 + step, keys=["f1", "f2", "f0"])
        out = ebc(kjt)
        grad = torch.randn(out.values().shape, generator=g)
        out.values().backward(grad)
        layout = ebc._layout(kjt.keys())
        ref.fused_backward_ref(optimizer_name, ref_weights, ref_states, layout, kjt.values(), kjt.offsets(), None, grad, **hyper)
    for bag, expected in zip(ebc.embedding_bags.values(), ref_weights):
        torch.testing.assert_close(bag.weight.double(), expected, atol=1e-6, rtol=1e-6)
    for name, expected_states in zip(optimizer.state_names, ref_states):
        for config, expected in zip(TABLES, expected_states):
            torch.testing.assert_close(ebc.optimizer_state()[config.name][name].double(), expected, atol=1e-6, rtol=1e-6)


def test_unfused_gives_dense_gradients_like_nn_embedding_bag():
    ebc = EmbeddingBagCollection(tables=TABLES)
    kjt = random_kjt(3)
    out = ebc(kjt).values()
    grad = torch.randn_like(out)
    out.backward(grad)
    weights = [b.weight.detach().double().requires_grad_() for b in ebc.embedding_bags.values()]
    layout = ebc._layout(kjt.keys())
    ref.embedding_bag_forward_ref(weights, *layout, kjt.values(), kjt.offsets()).backward(grad.double())
    for bag, w in zip(ebc.embedding_bags.values(), weights):
        torch.testing.assert_close(bag.weight.grad.double(), w.grad, atol=1e-6, rtol=1e-6)
    # ...so any torch optimizer can train it.
    torch.optim.SGD(ebc.parameters(), lr=0.1).step()


def test_sixteen_bit_tables():
    tables = [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=50, feature_names=["f0", "f1"], data_type=DataType.FP16),
        EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=30, feature_names=["f2"], data_type=DataType.FP16),
    ]
    ebc = EmbeddingBagCollection(tables=tables, optimizer=RowWiseAdagrad(lr=0.1))
    assert ebc.embedding_bags["t0"].weight.dtype == torch.float16
    kjt = random_kjt(4)
    out = ebc(kjt)
    assert out.values().dtype == torch.float32
    torch.testing.assert_close(out.values().double(), expected_pooled(ebc, kjt), atol=1e-6, rtol=1e-6)
    before = ebc.embedding_bags["t0"].weight.clone()
    out.values().backward(torch.ones_like(out.values()))
    assert not torch.equal(before, ebc.embedding_bags["t0"].weight)


def test_state_dict_round_trip_keeps_the_tables_in_place():
    a = EmbeddingBagCollection(tables=TABLES, optimizer=RowWiseAdagrad(lr=0.1))
    out = a(random_kjt(5))
    out.values().backward(torch.randn_like(out.values()))
    b = EmbeddingBagCollection(tables=TABLES, optimizer=RowWiseAdagrad(lr=0.1))
    storage = b.embedding_bags["t0"].weight.data_ptr()
    b.load_state_dict(a.state_dict())
    b.load_optimizer_state(a.optimizer_state())
    assert b.embedding_bags["t0"].weight.data_ptr() == storage
    kjt = random_kjt(6)
    torch.testing.assert_close(a(kjt).values(), b(kjt).values())
    assert torch.equal(a.optimizer_state()["t1"]["momentum1"], b.optimizer_state()["t1"]["momentum1"])


def test_optimizer_state_of_the_wrong_shape_is_refused():
    ebc = EmbeddingBagCollection(tables=TABLES, optimizer=RowWiseAdagrad(lr=0.1))
    state = ebc.optimizer_state()
    state["t0"] = {"momentum1": torch.zeros(49)}
    with pytest.raises(ValueError, match=r"t0.momentum1 has shape \(49,\); expected \(50,\)"):
        ebc.load_optimizer_state(state)


def test_momentum_scaled_sync_with_one_replica_folds_the_increment():
    ebc = EmbeddingBagCollection(tables=TABLES, optimizer=MomentumScaledRowWiseAdagrad(lr=0.1, momentum_scale=3.0))
    out = ebc(random_kjt(7))
    out.values().backward(torch.randn_like(out.values()))
    state = ebc.optimizer_state()["t0"]
    increment = state["momentum1_increment"].clone()
    assert increment.abs().sum() > 0
    ebc.sync()
    torch.testing.assert_close(state["momentum1"], 3.0 * increment)
    assert state["momentum1_increment"].abs().sum() == 0


def test_no_grad_lookup_leaves_tables_alone():
    ebc = EmbeddingBagCollection(tables=TABLES, optimizer=RowWiseAdagrad(lr=0.1))
    before = [b.weight.clone() for b in ebc.embedding_bags.values()]
    with torch.no_grad():
        out = ebc(random_kjt(8))
    assert not out.values().requires_grad
    for b, w in zip(ebc.embedding_bags.values(), before):
        assert torch.equal(b.weight, w)
