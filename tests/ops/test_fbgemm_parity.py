"""The fused row-wise AdaGrad against FBGEMM's TBE (EXACT_ROWWISE_ADAGRAD on
CPU), step for step, on the same tables, ids and gradients.

Where the two deliberately differ (docs/kernels.md): TBE skips weight decay
on float32 tables used by a single feature, and its weighted-mean backward
drops the 1/L of its forward. Those cases are compared with our reference
instead, and the TBE behaviour we do not copy is pinned here so a change in
FBGEMM shows up.
"""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
from fbgemm_gpu.tbe.config.embedding_config import ComputeDevice
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode as TbeWeightDecayMode

from dist_rec.ops import reference as ref

ops = torch.ops.dist_rec

LR, EPS = 0.05, 1e-8
STEPS = 5
# float32 on both sides, different summation orders: a few ulp per step.
TOL = dict(atol=1e-5, rtol=1e-5)


def make_tbe(rows, dims, feature_table, pooling, weight_decay=0.0, decay_mode=TbeWeightDecayMode.NONE):
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(r, d, EmbeddingLocation.HOST, ComputeDevice.CPU) for r, d in zip(rows, dims)],
        feature_table_map=feature_table,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=LR,
        eps=EPS,
        pooling_mode=PoolingMode.MEAN if pooling == "mean" else PoolingMode.SUM,
        weights_precision=SparseType.FP32,
        output_dtype=SparseType.FP32,
        weight_decay=weight_decay,
        weight_decay_mode=decay_mode,
    )


def random_batch(g, rows, feature_table, batch, index_dtype, weighted):
    lengths = torch.randint(0, 6, (len(feature_table) * batch,), generator=g)
    ids = [
        torch.randint(0, rows[t], (int(lengths[f * batch : (f + 1) * batch].sum()),), generator=g)
        for f, t in enumerate(feature_table)
    ]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    indices = torch.cat(ids)
    psw = torch.rand(len(indices), generator=g) if weighted else None
    return indices.to(index_dtype), offsets.to(index_dtype), psw


def run_both(
    seed, rows, dims, feature_table, pooling, weighted, index_dtype=torch.int64, weight_decay=0.0, decay="none", same_forward=True
):
    """Trains TBE and dist_rec side by side; returns both weights and momenta.
    With same_forward, also checks that every step's forward agrees."""
    decay_mode = {"none": TbeWeightDecayMode.NONE, "l2": TbeWeightDecayMode.L2, "decoupled": TbeWeightDecayMode.DECOUPLE}[decay]
    ours_mode = {"none": 0, "l2": 1, "decoupled": 2}[decay]
    tbe = make_tbe(rows, dims, feature_table, pooling, weight_decay, decay_mode)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.rand(r, d, generator=g) * 0.2 - 0.1 for r, d in zip(rows, dims)]
    with torch.no_grad():
        for w, tw in zip(weights, tbe.split_embedding_weights()):
            tw.copy_(w)
    momentum = [torch.zeros(r) for r in rows]
    pooling_code = 1 if pooling == "mean" else 0
    layout = (feature_table, [pooling_code] * len(feature_table), [])
    column = 0
    for t in feature_table:
        layout[2].append(column)
        column += dims[t]
    batch = 6
    for _ in range(STEPS):
        indices, offsets, psw = random_batch(g, rows, feature_table, batch, index_dtype, weighted)
        grad = torch.randn(batch, column, generator=g)
        out_tbe = tbe(indices, offsets, per_sample_weights=psw)
        out_ours = ops.embedding_bag_forward(weights, *layout, indices, offsets, psw)
        if same_forward:
            torch.testing.assert_close(out_ours, out_tbe, **TOL)
        out_tbe.backward(grad)
        ops.embedding_bag_backward_rowwise_adagrad_(
            weights, momentum, *layout, indices, offsets, psw, grad, LR, EPS, weight_decay, ours_mode
        )
    tbe_weights = [w.detach().clone() for w in tbe.split_embedding_weights()]
    tbe_momentum = [s[0].detach().clone() for s in tbe.split_optimizer_states()]
    return weights, momentum, tbe_weights, tbe_momentum


CASES = [
    dict(pooling="sum", weighted=False),
    dict(pooling="mean", weighted=False),
    dict(pooling="sum", weighted=True),
]


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['pooling']}{'-weighted' if c['weighted'] else ''}")
@pytest.mark.parametrize(
    "tables",
    [
        dict(rows=[40], dims=[8], feature_table=[0]),
        dict(rows=[40, 25, 60], dims=[4, 16, 8], feature_table=[0, 1, 2]),
        dict(rows=[30, 20], dims=[8, 12], feature_table=[0, 0, 1]),  # a shared table
    ],
    ids=["one-table", "three-tables", "shared-table"],
)
def test_matches_tbe_over_steps(tables, case, index_dtype):
    weights, momentum, tbe_weights, tbe_momentum = run_both(3, **tables, **case, index_dtype=index_dtype)
    for w, tw in zip(weights, tbe_weights):
        torch.testing.assert_close(w, tw, **TOL)
    for m, tm in zip(momentum, tbe_momentum):
        torch.testing.assert_close(m, tm, **TOL)


@pytest.mark.parametrize("decay", ["l2", "decoupled"])
def test_weight_decay_matches_tbe_on_shared_tables(decay):
    # TBE applies decay on shared tables; there the two agree.
    tables = dict(rows=[30, 20], dims=[8, 12], feature_table=[0, 0, 1, 1])
    weights, momentum, tbe_weights, tbe_momentum = run_both(4, **tables, pooling="sum", weighted=False, weight_decay=0.01, decay=decay)
    for w, tw in zip(weights, tbe_weights):
        torch.testing.assert_close(w, tw, **TOL)
    for m, tm in zip(momentum, tbe_momentum):
        torch.testing.assert_close(m, tm, **TOL)


def test_weight_decay_on_single_feature_tables_is_not_skipped():
    """TBE's fast path skips decay on a float32 table used by one feature; we
    decay every table, as our reference (and TBE's own shared-table path) does."""
    tables = dict(rows=[30], dims=[8], feature_table=[0])
    weights, _, tbe_weights, _ = run_both(
        5, **tables, pooling="sum", weighted=False, weight_decay=0.05, decay="l2", same_forward=False
    )
    _, _, tbe_without_decay, _ = run_both(5, **tables, pooling="sum", weighted=False, weight_decay=0.0, decay="none")
    torch.testing.assert_close(tbe_weights[0], tbe_without_decay[0])  # TBE: as if no decay
    assert (weights[0] - tbe_weights[0]).abs().max() > 1e-4  # ours: decayed

    # ...and ours is the reference's decayed update.
    g = torch.Generator().manual_seed(5)
    ref_weights = [(torch.rand(30, 8, generator=g) * 0.2 - 0.1).double()]
    ref_momentum = [torch.zeros(30, dtype=torch.float64)]
    for _ in range(STEPS):
        indices, offsets, psw = random_batch(g, [30], [0], 6, torch.int64, False)
        grad = torch.randn(6, 8, generator=g)
        ref.fused_backward_ref(
            "rowwise_adagrad", ref_weights, [ref_momentum], ([0], [0], [0]), indices, offsets, psw, grad,
            learning_rate=LR, eps=EPS, weight_decay=0.05, weight_decay_mode=1,
        )
    torch.testing.assert_close(weights[0].double(), ref_weights[0], **TOL)
