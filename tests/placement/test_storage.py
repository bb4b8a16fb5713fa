"""Storages behind the one interface: ``InMemoryStorage`` (the kernels on
the tables themselves) and ``MemmapStorage`` (rows in files, the kernels on
staged compact copies) compute the same lookups, fused updates, row
gradients and per-sample-weight gradients, bit for bit, and both match the
plain-PyTorch references in float64. Rows and blocks go in and out by id
and by range; bad ids and bad placements are refused by name.
"""

import re

import pytest
import torch

from dist_rec.ops import reference
from dist_rec.ops.embedding_bag import PoolingMode
from dist_rec.optim import SGD, MomentumScaledRowWiseAdagrad, RowWiseAdagrad
from dist_rec.placement import EmbeddingLocation, InMemoryStorage, MemmapStorage, TableSpec, create_storage, staged_ids

TABLES = [TableSpec("a", 50, 8), TableSpec("b", 7, 4), TableSpec("c", 300, 16)]
FEATURE_TABLE = [0, 1, 0, 2]  # table "a" serves two features
OPTIMIZERS = {
    "sgd": SGD(lr=0.3),
    "rowwise_adagrad": RowWiseAdagrad(lr=0.1, eps=1e-3),
    "rowwise_adagrad_l2": RowWiseAdagrad(lr=0.1, eps=1e-3, weight_decay=0.01, weight_decay_mode="l2"),
    "momentum_scaled": MomentumScaledRowWiseAdagrad(lr=0.1, eps=1e-3, momentum_scale=1.5, weight_decay=0.02, weight_decay_mode="decoupled"),
}


def _batch(seed: int, batch: int, weighted: bool, pooling=None):
    """Feature-major ids with empty bags and hot (repeated) ids."""
    g = torch.Generator().manual_seed(seed)
    pooling = pooling or [int(PoolingMode.SUM), int(PoolingMode.MEAN), int(PoolingMode.SUM), int(PoolingMode.MEAN)]
    dims = [TABLES[t].dim for t in FEATURE_TABLE]
    layout = (FEATURE_TABLE, pooling, [sum(dims[:i]) for i in range(len(dims))])
    lengths = torch.randint(0, 5, (len(FEATURE_TABLE) * batch,), generator=g)
    per_feature = lengths.view(len(FEATURE_TABLE), batch).sum(dim=1)
    ids = []
    for t, n in zip(FEATURE_TABLE, per_feature.tolist()):
        hot = torch.randint(0, 3, (n,), generator=g)
        cold = torch.randint(0, TABLES[t].num_rows, (n,), generator=g)
        ids.append(torch.where(torch.rand(n, generator=g) < 0.4, hot, cold))
    indices = torch.cat(ids)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    weights = torch.rand(indices.numel(), generator=g) if weighted else None
    grad = torch.randn(batch, sum(dims), generator=g)
    return layout, indices, offsets, weights, grad


def _storages(tmp_path, state_names, seed: int = 3):
    """The same tables in memory and in files."""
    memory = InMemoryStorage(TABLES, state_names, torch.device("cpu"))
    files = MemmapStorage(TABLES, state_names, torch.device("cpu"), tmp_path / "rows")
    g = torch.Generator().manual_seed(seed)
    for t, spec in enumerate(TABLES):
        weight = torch.rand(spec.num_rows, spec.dim, generator=g) - 0.5
        state = {n: torch.rand(spec.num_rows, generator=g) for n in state_names}
        for storage in (memory, files):
            storage.write_block(t, 0, weight, state)
    return memory, files


def _assert_same_rows(memory, files):
    for t in range(len(TABLES)):
        (w0, s0), (w1, s1) = memory.read_block(t), files.read_block(t)
        assert torch.equal(w0, w1), TABLES[t].name
        assert s0.keys() == s1.keys() and all(torch.equal(s0[n], s1[n]) for n in s0), TABLES[t].name


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("batch", [0, 1, 9])
def test_staged_storage_equals_in_memory_bit_for_bit(tmp_path, optimizer_name, weighted, batch):
    optimizer = OPTIMIZERS[optimizer_name]
    memory, files = _storages(tmp_path, optimizer.state_names)
    for step in range(3):
        layout, indices, offsets, weights, grad = _batch(10 * batch + step, batch, weighted)
        pooled = memory.forward(layout, indices, offsets, weights)
        assert torch.equal(files.forward(layout, indices, offsets, weights), pooled)
        if weighted:
            assert torch.equal(
                files.per_sample_weights_grad(layout, indices, offsets, grad),
                memory.per_sample_weights_grad(layout, indices, offsets, grad),
            )
        for (i0, g0), (i1, g1) in zip(zip(*memory.row_grads(layout, indices, offsets, weights, grad)),
                                      zip(*files.row_grads(layout, indices, offsets, weights, grad))):  # fmt: skip
            assert torch.equal(i0, i1) and torch.equal(g0, g1)
        memory.fused_update(optimizer, layout, indices, offsets, weights, grad)
        files.fused_update(optimizer, layout, indices, offsets, weights, grad)
        _assert_same_rows(memory, files)


@pytest.mark.parametrize("optimizer_name", ["rowwise_adagrad", "sgd"])
def test_staged_storage_matches_the_reference_in_float64(tmp_path, optimizer_name):
    optimizer = OPTIMIZERS[optimizer_name]
    _, files = _storages(tmp_path, optimizer.state_names)
    weights = [files.read_block(t)[0].double() for t in range(len(TABLES))]
    states = [[files.read_block(t)[1][n].double() for t in range(len(TABLES))] for n in optimizer.state_names]
    layout, indices, offsets, psw, grad = _batch(5, 7, weighted=True)
    expected = reference.embedding_bag_forward_ref(weights, *layout, indices, offsets, psw)
    torch.testing.assert_close(files.forward(layout, indices, offsets, psw).double(), expected, rtol=1e-5, atol=1e-6)
    hyper = dict(learning_rate=optimizer.lr)
    if optimizer_name == "rowwise_adagrad":
        hyper["eps"] = optimizer.eps
    reference.fused_backward_ref(optimizer_name, weights, states, layout, indices, offsets, psw, grad.double(), **hyper)
    files.fused_update(optimizer, layout, indices, offsets, psw, grad)
    for t in range(len(TABLES)):
        torch.testing.assert_close(files.read_block(t)[0].double(), weights[t], rtol=1e-5, atol=1e-6)


def test_rows_and_blocks_by_id_and_range(tmp_path):
    for storage in _storages(tmp_path, ("momentum1",)):
        ids = torch.tensor([4, 0, 49])
        weight, state = storage.read_rows(0, ids)
        storage.write_rows(0, ids, weight + 1, {"momentum1": state["momentum1"] * 2})
        again, again_state = storage.read_rows(0, ids)
        assert torch.equal(again, weight + 1) and torch.equal(again_state["momentum1"], state["momentum1"] * 2)
        block, block_state = storage.read_block(2, 10, 5)
        assert block.shape == (5, 16) and block_state["momentum1"].shape == (5,)
        storage.write_block(2, 10, torch.zeros(5, 16))
        assert storage.read_block(2, 10, 5)[0].abs().sum() == 0
        with pytest.raises(IndexError, match=re.escape("rows 298..302 are outside table 'c' with 300 rows")):
            storage.read_block(2, 298, 5)


def test_memmap_blocks_are_copies_and_in_memory_blocks_are_views(tmp_path):
    """The rule behind the interface: a block changed must be handed back."""
    memory, files = _storages(tmp_path, ())
    for storage, live in ((memory, True), (files, False)):
        block, _ = storage.read_block(1)
        block.fill_(9.0)
        assert bool((storage.read_block(1)[0] == 9.0).all()) == live


def test_out_of_range_ids_are_refused_like_the_kernels_refuse_them(tmp_path):
    _, files = _storages(tmp_path, ())
    layout, indices, offsets, weights, _ = _batch(1, 4, False)
    bad = indices.clone()
    position = int(offsets[4 * 3])  # the first id of feature slot 3 (table "c", index 2)
    bad[position] = 300
    with pytest.raises(IndexError, match=rf"id 300 at indices\[{position}\] \(feature slot 3, sample \d+\) is out of range for table 2 with 300 rows"):
        files.forward(layout, bad, offsets, weights)
    unique, remapped = staged_ids(layout, indices, offsets, TABLES)
    assert all(bool((u[1:] > u[:-1]).all()) for u in unique)  # sorted, unique
    assert torch.equal(torch.cat([unique[t][remapped[offsets[4 * f]:offsets[4 * (f + 1)]]]
                                  for f, t in enumerate(FEATURE_TABLE)]), indices)  # fmt: skip


def test_create_storage_picks_by_location(tmp_path):
    cpu = torch.device("cpu")
    assert isinstance(create_storage("device", TABLES, (), cpu), InMemoryStorage)
    assert isinstance(create_storage(EmbeddingLocation.HOST, TABLES, (), cpu), InMemoryStorage)
    assert isinstance(create_storage("ssd", TABLES, (), cpu, str(tmp_path)), MemmapStorage)
    with pytest.raises(ValueError, match=re.escape("Tables ['a', 'b', 'c'] are placed at location 'ssd', but no storage directory")):
        create_storage("ssd", TABLES, (), cpu)
    with pytest.raises(ValueError, match=re.escape("Invalid location='tape'.")):
        create_storage("tape", TABLES, (), cpu)
