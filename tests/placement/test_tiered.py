"""``TieredStorage`` (hot rows in memory, the rest in an O_DIRECT file)
trains exactly like ``InMemoryStorage``: lookups, fused updates over several
steps, row and per-sample-weight gradients, at hot fractions of 0%, 100% and
in between, with ids repeated across the two tiers and rows renumbered
hottest first. Its cold files are refused by name when missing, truncated or
foreign; its blocks come out in the table's own order (a checkpoint of a
tiered table loads into an in-memory one and back).
"""

import numpy as np
import pytest
import torch

from dist_rec.optim import RowWiseAdagrad
from dist_rec.placement import InMemoryStorage, TableSpec
from dist_rec.placement.cold_file import ColdFileError, ColdRowFile
from dist_rec.placement.tiered import TieredStorage

from test_storage import OPTIMIZERS, TABLES, _batch

CPU = torch.device("cpu")


def _orders(seed: int):
    g = np.random.default_rng(seed)
    return [g.permutation(spec.num_rows) for spec in TABLES]


def _pair(tmp_path, state_names, hot_fraction: float, ordered: bool = True, seed: int = 3):
    memory = InMemoryStorage(TABLES, state_names, CPU)
    hot_rows = [int(round(hot_fraction * s.num_rows)) for s in TABLES]
    tiered = TieredStorage(TABLES, state_names, CPU, tmp_path / "tiers", hot_rows, _orders(seed) if ordered else None)
    g = torch.Generator().manual_seed(seed)
    for t, spec in enumerate(TABLES):
        weight = torch.rand(spec.num_rows, spec.dim, generator=g) - 0.5
        state = {n: torch.rand(spec.num_rows, generator=g) for n in state_names}
        for storage in (memory, tiered):
            storage.write_block(t, 0, weight, state)
    return memory, tiered


def _assert_same(memory, tiered, atol=0.0):
    for t in range(len(TABLES)):
        (w0, s0), (w1, s1) = memory.read_block(t), tiered.read_block(t)
        torch.testing.assert_close(w1, w0, rtol=0, atol=atol)
        for n in s0:
            torch.testing.assert_close(s1[n], s0[n], rtol=0, atol=atol)


@pytest.mark.parametrize("hot_fraction", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("optimizer_name", ["rowwise_adagrad", "rowwise_adagrad_l2", "sgd"])
@pytest.mark.parametrize("weighted", [False, True])
def test_tiered_storage_trains_exactly_like_in_memory(tmp_path, hot_fraction, optimizer_name, weighted):
    optimizer = OPTIMIZERS[optimizer_name]
    memory, tiered = _pair(tmp_path, optimizer.state_names, hot_fraction)
    for step in range(5):
        layout, indices, offsets, weights, grad = _batch(100 + step, 9, weighted)
        tiered.prefetch(layout, indices, offsets)
        pooled = memory.forward(layout, indices, offsets, weights)
        assert torch.equal(tiered.forward(layout, indices, offsets, weights), pooled)
        if weighted:
            assert torch.equal(
                tiered.per_sample_weights_grad(layout, indices, offsets, grad),
                memory.per_sample_weights_grad(layout, indices, offsets, grad),
            )
        memory.fused_update(optimizer, layout, indices, offsets, weights, grad)
        tiered.fused_update(optimizer, layout, indices, offsets, weights, grad)
    tiered.flush()
    _assert_same(memory, tiered)
    tiered.close()


def test_prefetches_a_step_ahead_see_the_rows_the_step_before_updated(tmp_path):
    # Every batch repeats the same few ids, split over both tiers: each
    # prefetch reads blocks whose rows the previous update has just stepped.
    optimizer = RowWiseAdagrad(lr=0.2, eps=1e-3)
    memory, tiered = _pair(tmp_path, optimizer.state_names, 0.5, ordered=False)
    batches = [_batch(7, 6, False) for _ in range(6)]
    layout, indices, offsets, _, grad = batches[0]
    for b in range(len(batches)):
        layout, indices, offsets, _, grad = batches[b]
        if b == 0:
            tiered.prefetch(layout, indices, offsets)
        assert torch.equal(tiered.forward(layout, indices, offsets, None), memory.forward(layout, indices, offsets, None))
        if b + 1 < len(batches):  # the next batch's reads start before this update
            tiered.prefetch(*batches[b + 1][:3])
        memory.fused_update(optimizer, layout, indices, offsets, None, grad)
        tiered.fused_update(optimizer, layout, indices, offsets, None, grad)
    tiered.flush()
    _assert_same(memory, tiered)
    assert tiered.cold_blocks_read() > 0


def test_row_gradients_and_rows_by_id_across_tiers(tmp_path):
    memory, tiered = _pair(tmp_path, ("momentum1",), 0.4)
    layout, indices, offsets, weights, grad = _batch(3, 8, True)
    for (i0, g0), (i1, g1) in zip(zip(*memory.row_grads(layout, indices, offsets, weights, grad)),
                                  zip(*tiered.row_grads(layout, indices, offsets, weights, grad))):  # fmt: skip
        assert torch.equal(i0, i1) and torch.equal(g0, g1)
    ids = torch.tensor([0, 299, 5, 150])
    for storage in (memory, tiered):
        weight, state = storage.read_rows(2, ids)
        storage.write_rows(2, ids, weight * 2, {"momentum1": state["momentum1"] + 1})
    tiered.flush()
    _assert_same(memory, tiered)


def test_blocks_come_out_in_the_table_order_and_load_back(tmp_path):
    # A checkpoint is blocks: a tiered table's blocks load into an in-memory one and back.
    _, tiered = _pair(tmp_path, ("momentum1",), 0.25)
    memory = InMemoryStorage(TABLES, ("momentum1",), CPU)
    for t in range(len(TABLES)):
        weight, state = tiered.read_block(t)
        memory.write_block(t, 0, weight.clone(), {k: v.clone() for k, v in state.items()})
    again = TieredStorage(TABLES, ("momentum1",), CPU, tmp_path / "again", [10, 2, 200], _orders(9))
    for t in range(len(TABLES)):
        weight, state = memory.read_block(t)
        again.write_block(t, 10 if t == 2 else 0, weight[10:] if t == 2 else weight,
                          {k: (v[10:] if t == 2 else v) for k, v in state.items()})  # fmt: skip
        if t == 2:
            again.write_block(t, 0, weight[:10], {k: v[:10] for k, v in state.items()})
    _assert_same(memory, again)


def test_reset_draws_every_row_in_range_with_zero_state(tmp_path):
    tiered = TieredStorage(TABLES, ("momentum1",), CPU, tmp_path / "t", [5, 0, 100], _orders(1))
    tiered.reset_([(-0.1, 0.1), (0.2, 0.3), (-1.0, -0.5)])
    for t, (low, high) in enumerate([(-0.1, 0.1), (0.2, 0.3), (-1.0, -0.5)]):
        weight, state = tiered.read_block(t)
        assert weight.min() >= low and weight.max() <= high and weight.std() > 0
        assert torch.equal(state["momentum1"], torch.zeros(TABLES[t].num_rows))


def test_cold_files_that_are_missing_truncated_or_foreign_are_refused_by_name(tmp_path):
    path = tmp_path / "t.cold"
    with pytest.raises(ColdFileError, match=r"Missing tier file: the cold rows of table 'emb' \(.*t.cold\)"):
        ColdRowFile(path, "emb", 1000, 16, 1, create=False)
    ColdRowFile(path, "emb", 1000, 16, 1).close()
    ColdRowFile(path, "emb", 1000, 16, 1, create=False).close()  # its own file opens
    with pytest.raises(ColdFileError, match=r"Foreign tier file: the cold rows of table 'other'.*'table': 'emb'"):
        ColdRowFile(path, "other", 1000, 16, 1, create=False)
    with pytest.raises(ColdFileError, match=r"Foreign tier file: the cold rows of table 'emb'.*num_rows"):
        ColdRowFile(path, "emb", 2000, 16, 1, create=False)
    with open(path, "r+b") as f:
        f.truncate(8192)
    with pytest.raises(ColdFileError, match=r"Truncated tier file: the cold rows of table 'emb' \(.*\) has 8192 bytes"):
        ColdRowFile(path, "emb", 1000, 16, 1, create=False)
    path.write_bytes(b"not ours" * 1000)
    with pytest.raises(ColdFileError, match="Foreign tier file: .* is not a dist_rec cold-row file"):
        ColdRowFile(path, "emb", 1000, 16, 1, create=False)


def test_records_larger_than_a_block_and_runs_of_blocks(tmp_path):
    # 1100 floats a row: each record takes two blocks; reads merge neighbours.
    spec = [TableSpec("wide", 40, 1100)]
    memory = InMemoryStorage(spec, ("momentum1",), CPU)
    tiered = TieredStorage(spec, ("momentum1",), CPU, tmp_path / "w", [7], [np.random.default_rng(0).permutation(40)])
    weight = torch.randn(40, 1100)
    for storage in (memory, tiered):
        storage.write_block(0, 0, weight, {"momentum1": torch.zeros(40)})
    optimizer = RowWiseAdagrad(lr=0.1, eps=1e-3)
    layout = ([0], [0], [0])
    indices = torch.tensor([3, 3, 39, 0, 12, 13, 14])
    offsets = torch.tensor([0, 2, 4, 7])
    grad = torch.randn(3, 1100)
    for storage in (memory, tiered):
        storage.fused_update(optimizer, layout, indices, offsets, None, grad)
    tiered.flush()
    (w0, s0), (w1, s1) = memory.read_block(0), tiered.read_block(0)
    assert torch.equal(w0, w1) and torch.equal(s0["momentum1"], s1["momentum1"])


def test_bad_hot_rows_and_orders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hot_rows=51 for table 'a' with 50 rows"):
        TieredStorage(TABLES, (), CPU, tmp_path, [51, 0, 0])
    with pytest.raises(ValueError, match="row order for table 'b'"):
        TieredStorage(TABLES, (), CPU, tmp_path, [1, 1, 1], [None, np.array([0, 0, 1, 2, 3, 4, 5]), None])
