"""Non-finite values never reach a row: the fused update refuses a NaN or
inf gradient (in the CPU kernels' copy of it, or a cheap sum first, the
element-wise test when the sum is not finite), and per-id weights must be
finite."""

import pytest
import torch

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.modules.embedding_configs import PoolingType
from dist_rec.modules.embedding_modules import check_finite_gradient, refusing_non_finite_gradient
from dist_rec.optim import SGD, MomentumScaledRowWiseAdagrad, RowWiseAdagrad
from dist_rec.placement import InMemoryStorage, MemmapStorage, TableSpec
from dist_rec.sharding.lookup import FusedUpdate, LocalLookup


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_gradient_is_refused_naming_the_tables(bad):
    grad = torch.randn(8, 4)
    grad[3, 2] = bad
    with pytest.raises(FloatingPointError, match=r"tables \['t0', 't1'\]"):
        check_finite_gradient(grad, ["t0", "t1"])


def test_finite_values_whose_sum_overflows_pass():
    grad = torch.full((4, 4), 3e38)  # the sum is inf; every element is finite
    check_finite_gradient(grad, ["t0"])
    check_finite_gradient(torch.empty(0, 4), ["t0"])


def test_non_finite_per_id_weights_are_refused_and_rows_stay():
    ebc = EmbeddingBagCollection(
        [EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0"])],
        optimizer=RowWiseAdagrad(lr=0.1), is_weighted=True,
    )  # fmt: skip
    before = ebc.state_dict()["embedding_bags.t0.weight"].clone()
    kjt = KeyedJaggedTensor(["f0"], torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1]),
                            weights=torch.tensor([1.0, float("nan"), 0.5]))  # fmt: skip
    with pytest.raises(ValueError, match=r"Invalid per-id weight nan at values\[1\]"):
        ebc(kjt)
    assert torch.equal(ebc.state_dict()["embedding_bags.t0.weight"], before)


# -- the update refuses it whichever path tests it ------------------------------------

TABLES = [TableSpec("a", 50, 8), TableSpec("b", 7, 20), TableSpec("c", 300, 16)]
FEATURE_TABLE = [0, 1, 0, 2]  # table "a" serves two features
OPTIMIZERS = {
    "sgd": lambda: SGD(lr=0.3),
    "rowwise_adagrad": lambda: RowWiseAdagrad(lr=0.1, eps=1e-3),
    "momentum_scaled": lambda: MomentumScaledRowWiseAdagrad(lr=0.1, eps=1e-3, momentum_scale=1.5),
}


def _storage(kind: str, state_names, tmp_path):
    if kind == "in_memory":
        storage = InMemoryStorage(TABLES, state_names, torch.device("cpu"))
    else:
        storage = MemmapStorage(TABLES, state_names, torch.device("cpu"), tmp_path / "rows")
    g = torch.Generator().manual_seed(0)
    for t, spec in enumerate(TABLES):
        state = {n: torch.rand(spec.num_rows, generator=g) for n in state_names}
        storage.write_block(t, 0, torch.rand(spec.num_rows, spec.dim, generator=g) - 0.5, state)
    return storage


def _blocks(storage):
    """Copies (an in-memory storage's blocks are views)."""
    return [_copy(storage.read_block(t)) for t in range(storage.num_tables)]


def _copy(block):
    weight, state = block
    return weight.clone(), {n: s.clone() for n, s in state.items()}


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["in_memory", "memmap"])  # the kernel tests it; the lookup tests it first
def test_a_sharded_lookup_refuses_a_non_finite_gradient_and_keeps_every_row(kind, optimizer_name, bad, tmp_path):
    optimizer = OPTIMIZERS[optimizer_name]()
    storage = _storage(kind, optimizer.state_names, tmp_path)
    assert storage.fused_update_refuses_non_finite(optimizer, torch.zeros(1)) == (kind == "in_memory")
    lookup = LocalLookup(storage, FEATURE_TABLE, [PoolingType.SUM] * 4, optimizer, FusedUpdate(), is_weighted=False)
    batch = 5
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 4, (len(FEATURE_TABLE) * batch,), generator=g)
    per_feature = lengths.view(len(FEATURE_TABLE), batch).sum(1).tolist()
    values = torch.cat([torch.randint(0, TABLES[t].num_rows, (n,), generator=g) for t, n in zip(FEATURE_TABLE, per_feature)])
    before = _blocks(storage)
    pooled = lookup(lengths, values, None)
    grad = torch.randn(pooled.shape, generator=g)
    grad[batch - 1, pooled.shape[1] - 3] = bad
    with pytest.raises(FloatingPointError, match=r"tables \['a', 'b', 'c'\] holds NaN or inf; the rows were not updated"):
        pooled.backward(grad)
    for (w0, s0), (w1, s1) in zip(before, _blocks(storage)):
        assert torch.equal(w0, w1) and all(torch.equal(s0[n], s1[n]) for n in s0)
    # A finite gradient steps the rows.
    lookup(lengths, values, None).backward(torch.randn(pooled.shape, generator=g))
    assert any(not torch.equal(w0, w1) for (w0, _), (w1, _) in zip(before, _blocks(storage)))


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_a_collection_refuses_a_non_finite_gradient_naming_the_first_value(optimizer_name):
    optimizer = OPTIMIZERS[optimizer_name]()
    ebc = EmbeddingBagCollection(
        [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4 + 12 * i, num_embeddings=10, feature_names=[f"f{i}"]) for i in range(2)],
        optimizer=optimizer,
    )  # fmt: skip
    before = _blocks(ebc.storage)
    kjt = KeyedJaggedTensor(["f0", "f1"], torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([2, 1, 1, 1]))
    out = ebc(kjt).values()
    grad = torch.randn_like(out)
    grad[1, 6] = float("inf")  # sample 1, feature f1's third column
    with pytest.raises(FloatingPointError, match=r"tables \['t0', 't1'\]") as caught:
        out.backward(grad)
    assert "(inf at sample 1, column 6: feature slot 1, table 1)" in str(caught.value)
    after = _blocks(ebc.storage)
    for (w0, s0), (w1, s1) in zip(before, after):
        assert torch.equal(w0, w1) and all(torch.equal(s0[n], s1[n]) for n in s0)


class _PythonBackward:
    def backward_(self, *args) -> None:
        raise AssertionError("stepped")


def test_without_the_kernels_the_gradient_is_tested_before_the_update_runs():
    class PythonSGD(SGD):  # its own backward_: the kernels' test does not apply
        backward_ = _PythonBackward.backward_

    class MixedSGD(_PythonBackward, SGD):  # a backward_ from a mixin
        pass

    class DeclaredSGD(SGD):  # one that says its backward_ refuses them too
        backward_ = _PythonBackward.backward_
        backward_refuses_non_finite = True

    storage = InMemoryStorage(TABLES, (), torch.device("cpu"))
    cpu = torch.zeros(1)
    assert storage.fused_update_refuses_non_finite(SGD(lr=0.1), cpu)
    assert storage.fused_update_refuses_non_finite(MomentumScaledRowWiseAdagrad(lr=0.1), cpu)
    assert storage.fused_update_refuses_non_finite(DeclaredSGD(lr=0.1), cpu)
    assert not storage.fused_update_refuses_non_finite(PythonSGD(lr=0.1), cpu)
    assert not storage.fused_update_refuses_non_finite(MixedSGD(lr=0.1), cpu)
    patched = SGD(lr=0.1)
    object.__setattr__(patched, "backward_", lambda *args: None)
    assert not storage.fused_update_refuses_non_finite(patched, cpu)
    assert not storage.fused_update_refuses_non_finite(SGD(lr=0.1), torch.zeros(1, device="meta"))
    grad = torch.randn(4, 4)
    grad[2, 1] = float("nan")
    ran = []
    with pytest.raises(FloatingPointError, match=r"tables \['t0'\]"):
        with refusing_non_finite_gradient(grad, ["t0"], checked_in_update=False):
            ran.append(True)
    assert not ran
    # Another error of the update passes through unchanged.
    with pytest.raises(RuntimeError, match="unrelated"):
        with refusing_non_finite_gradient(grad, ["t0"], checked_in_update=True):
            raise RuntimeError("unrelated")
    # A kernel's refusal is named by table on a path tested first too (a gradient changed on the way).
    with pytest.raises(FloatingPointError, match=r"tables \['t0'\].*\(op: grad_output holds NaN or inf \(nan"):
        with refusing_non_finite_gradient(torch.zeros(4, 4), ["t0"], checked_in_update=False):
            raise RuntimeError("op: grad_output holds NaN or inf (nan at sample 0, column 0: feature slot 0, table 0)")
