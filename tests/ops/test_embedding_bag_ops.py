"""The pooled-embedding kernels against their plain-PyTorch references.

Every CPU inner-loop build this machine runs (AVX-512, AVX2, scalar) is
checked; references compute in float64 from the same inputs.
"""

import contextlib
import dataclasses
import re

import pytest
import torch

from dist_rec.ops import embedding_bag as eb
from dist_rec.ops import reference as ref
from dist_rec.testing.random_problems import LookupProblem, random_problem, redraw_batch

ops = torch.ops.dist_rec

ISAS = eb.supported_cpu_isas()
SEEDS = [0, 1, 2, 3]
# Against a reference computed in float32 the kernels agree to 1e-6 (the
# promise); against float64 the float32 accumulation of tens of terms of
# magnitude ~1 costs a few 1e-6, so that comparison allows 1e-5.
FP32_TOL = dict(atol=1e-6, rtol=1e-6)
FP64_TOL = dict(atol=1e-5, rtol=1e-5)


def assert_matches(got, ref_fn, *args):
    """got agrees with ref_fn(*args) computed in float32 (1e-6) and in float64 (1e-5)."""
    torch.testing.assert_close(got, ref_fn(*args, dtype=torch.float32), **FP32_TOL)
    torch.testing.assert_close(got.double(), ref_fn(*args, dtype=torch.float64), **FP64_TOL)


@pytest.fixture(params=ISAS)
def isa(request):
    previous = eb.set_cpu_isa(request.param)
    yield request.param
    eb.set_cpu_isa("")
    del previous


def _problem_cases():
    cases = []
    for seed in SEEDS:
        cases.append(dict(seed=seed))
    cases += [
        dict(seed=10, weighted=True),
        dict(seed=11, weighted=True, pooling="mean"),
        dict(seed=12, index_dtype=torch.int32),
        dict(seed=13, batch=0),
        dict(seed=14, batch=1, empty_bag_fraction=1.0),
        dict(seed=15, max_rows=2, max_bag=12),  # many repeated ids
        dict(seed=16, dims=[200, 3, 2050]),  # wide row (heap scratch) and odd tails
        dict(seed=17, num_tables=1),
        # Unweighted sum pooling: the backward's sort carries gradient offsets.
        dict(seed=18, pooling="sum"),
        dict(seed=19, pooling="sum", max_rows=3, max_bag=10),
    ]
    return cases


CASES = _problem_cases()


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_matches_reference(isa, case):
    p = random_problem(**case)
    out = ops.embedding_bag_forward(*p.op_args())
    assert out.dtype == torch.float32 and out.shape == (p.batch, p.out_dim)
    assert_matches(out, ref.embedding_bag_forward_ref, *p.op_args())


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
def test_forward_16bit_weights(isa, weight_dtype, seed):
    # 16-bit rows convert to float32 exactly; accumulation is float32.
    p = random_problem(seed, weight_dtype=weight_dtype, weighted=seed % 2 == 1)
    out = ops.embedding_bag_forward(*p.op_args())
    assert_matches(out, ref.embedding_bag_forward_ref, *p.op_args())


@pytest.mark.parametrize("dim", [1, 7, 8, 16, 24, 40, 48, 56, 100, 136, 264])
def test_bad_id_is_refused_at_every_width(isa, dim):
    # Rows of several register blocks: no block may read the bad row.
    p = random_problem(50, dims=[dim, dim, dim], max_rows=30, batch=6)
    for bad_id in (-1, 30, 2**40):
        indices = p.indices.clone()
        indices[len(indices) // 2] = bad_id
        with pytest.raises(IndexError, match=f"id {bad_id} at indices"):
            ops.embedding_bag_forward(p.weights, *p.layout, indices, p.offsets, p.per_sample_weights)
        grad = torch.zeros(p.batch, p.out_dim)
        with pytest.raises(IndexError, match=f"id {bad_id} at indices"):
            ops.embedding_bag_backward_row_grad(p.weights, *p.layout, indices, p.offsets, p.per_sample_weights, grad)


def test_non_finite_per_sample_weights_are_refused_naming_slot_and_table():
    p = random_problem(10, weighted=True)
    position = len(p.indices) // 2
    bag = int(torch.searchsorted(p.offsets, torch.tensor([position], dtype=p.offsets.dtype), right=True)) - 1
    feature, sample = divmod(bag, p.batch)
    for bad in (float("nan"), float("inf"), float("-inf")):
        psw = p.per_sample_weights.clone()
        psw[position] = bad
        with pytest.raises(ValueError) as caught:
            eb.embedding_bag_forward(p.weights, *p.layout, p.indices, p.offsets, psw)
        assert (
            f"embedding_bag_forward: Invalid per-id weight {bad} at indices[{position}] (feature slot {feature}, "
            f"sample {sample}) for table {p.layout[0][feature]}; per_sample_weights must be finite"
        ) in str(caught.value)
    # Finite weights whose sum overflows pass.
    psw = torch.full_like(p.per_sample_weights, 3e38)
    eb.embedding_bag_forward(p.weights, *p.layout, p.indices, p.offsets, psw)


@pytest.mark.parametrize("where", ["indices", "offsets", "per_sample_weights"])
def test_meta_inputs_with_cpu_tables_are_refused(where):
    # Meta outranks CPU in dispatch: the shape-only kernel used to answer, with uninitialised rows.
    p = random_problem(10, weighted=True)
    args = dict(indices=p.indices, offsets=p.offsets, per_sample_weights=p.per_sample_weights)
    args[where] = args[where].to("meta")
    message = f"embedding_bag_forward: {where} must be on cpu like the weights; it is on meta"
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.embedding_bag_forward(p.weights, *p.layout, *args.values())
    with pytest.raises(ValueError, match=re.escape(message)):
        eb.embedding_bag_forward(p.weights, *p.layout, *args.values())
    grad = torch.zeros(p.batch, p.out_dim)
    with pytest.raises(ValueError, match=re.escape(f"embedding_bag_backward_sgd_: {where} must be on cpu")):
        ops.embedding_bag_backward_sgd_(p.weights, *p.layout, *args.values(), grad, 0.1)
    # All on meta (shapes only) stays allowed.
    meta = [w.to("meta") for w in p.weights]
    out = ops.embedding_bag_forward(meta, *p.layout, *(t.to("meta") for t in args.values()))
    assert out.device.type == "meta" and out.shape == (p.batch, p.out_dim)


def test_non_integer_offsets_are_refused():
    p = random_problem(10)
    with pytest.raises(TypeError, match=re.escape("offsets must have the dtype of indices (Long); got Float")):
        eb.embedding_bag_forward(p.weights, *p.layout, p.indices, p.offsets.float(), None)


def test_forward_is_identical_on_every_isa():
    p = random_problem(5, weighted=True, dims=[13, 64, 7])
    outputs = []
    for isa in ISAS:
        eb.set_cpu_isa(isa)
        outputs.append(ops.embedding_bag_forward(*p.op_args()))
    eb.set_cpu_isa("")
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_row_grad_matches_reference(isa, case):
    p = random_problem(**case)
    grad = torch.randn(p.batch, p.out_dim, generator=torch.Generator().manual_seed(case["seed"]))
    row_ids, row_grads = ops.embedding_bag_backward_row_grad(*p.op_args(), grad)
    assert len(row_ids) == len(p.weights)
    for dtype, tol in ((torch.float32, FP32_TOL), (torch.float64, FP64_TOL)):
        ref_ids, ref_grads = ref.embedding_bag_backward_row_grad_ref(*p.op_args(), grad, dtype=dtype)
        for t in range(len(p.weights)):
            assert torch.equal(row_ids[t], ref_ids[t])
            assert row_grads[t].shape == (len(ref_ids[t]), p.weights[t].shape[1])
            torch.testing.assert_close(row_grads[t].to(dtype), ref_grads[t], **tol)


@pytest.mark.parametrize("case", CASES[:6], ids=_case_id)
def test_per_sample_weights_grad_matches_reference(isa, case):
    p = random_problem(**case)
    grad = torch.randn(p.batch, p.out_dim, generator=torch.Generator().manual_seed(1))
    args = (p.weights, *p.layout, p.indices, p.offsets, grad)
    out = ops.embedding_bag_per_sample_weights_grad(*args)
    # A dot product over D terms: the kernel's lane-wise order and torch.dot's
    # differ by a few float32 roundings, so only the float64 check applies.
    expected = ref.embedding_bag_per_sample_weights_grad_ref(*args, dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, **FP64_TOL)


OPTIMIZERS = {
    "sgd": dict(hyper=dict(learning_rate=0.1), states=0),
    "rowwise_adagrad": dict(hyper=dict(learning_rate=0.1, eps=1e-8), states=1),
    "momentum_scaled_rowwise_adagrad": dict(hyper=dict(learning_rate=0.1, eps=1e-8, momentum_scale=1.7), states=2),
}
DECAYS = [
    dict(weight_decay=0.0, weight_decay_mode=eb.WeightDecayMode.NONE),
    dict(weight_decay=0.05, weight_decay_mode=eb.WeightDecayMode.L2),
    dict(weight_decay=0.05, weight_decay_mode=eb.WeightDecayMode.DECOUPLED),
]


def _fused_step(optimizer, weights, states, p, grad, hyper):
    args = (*p.layout, p.indices, p.offsets, p.per_sample_weights, grad)
    if optimizer == "sgd":
        ops.embedding_bag_backward_sgd_(weights, *args, hyper["learning_rate"], hyper["weight_decay"], int(hyper["weight_decay_mode"]))
    elif optimizer == "rowwise_adagrad":
        ops.embedding_bag_backward_rowwise_adagrad_(
            weights, states[0], *args, hyper["learning_rate"], hyper["eps"], hyper["weight_decay"], int(hyper["weight_decay_mode"])
        )
    else:
        ops.embedding_bag_backward_momentum_scaled_rowwise_adagrad_(
            weights,
            states[0],
            states[1],
            *args,
            hyper["learning_rate"],
            hyper["eps"],
            hyper["momentum_scale"],
            hyper["weight_decay"],
            int(hyper["weight_decay_mode"]),
        )


def _run_steps(optimizer, case, decay, steps=6, weight_dtype=torch.float32, ref_dtype=torch.float64, reference=True):
    """Runs `steps` fused steps (fresh ids and gradients each) on the kernel and,
    if `reference`, on the reference (computing in ref_dtype); returns both
    final weights and states."""
    spec = OPTIMIZERS[optimizer]
    hyper = {**spec["hyper"], **decay}
    p0 = random_problem(**case, weight_dtype=weight_dtype)
    weights = p0.clone_weights()
    ref_weights = p0.clone_weights(ref_dtype)
    g = torch.Generator().manual_seed(100 + case["seed"])
    states = [[torch.rand(w.shape[0], generator=g) for w in weights] for _ in range(spec["states"])]
    ref_states = [[s.to(ref_dtype, copy=True) for s in table_states] for table_states in states]
    for step in range(steps):
        p = redraw_batch(p0, seed=case["seed"] * 1000 + step, max_bag=case.get("max_bag", 6))
        p.weights = weights
        grad = torch.randn(p.batch, p.out_dim, generator=g)
        _fused_step(optimizer, weights, states, p, grad, hyper)
        if not reference:
            continue
        ref.fused_backward_ref(
            optimizer, ref_weights, ref_states, p.layout, p.indices, p.offsets, p.per_sample_weights, grad, dtype=ref_dtype, **hyper
        )
        if weight_dtype != torch.float32:
            # The kernel stores each step rounded to 16 bits; so does the reference.
            ref_weights = [w.to(weight_dtype).to(ref_dtype) for w in ref_weights]
    return weights, states, ref_weights, ref_states


def _assert_steps_match(weights, states, ref_weights, ref_states, ref_dtype=torch.float64, **tol):
    """Weights and optimizer states against the reference's, in ref_dtype."""
    tol = tol or FP64_TOL
    for w, rw in zip(weights, ref_weights):
        torch.testing.assert_close(w.to(ref_dtype), rw, **tol)
    for table_states, ref_table_states in zip(states, ref_states):
        for s, rs in zip(table_states, ref_table_states):
            torch.testing.assert_close(s.to(ref_dtype), rs, **tol)


def _assert_identical(result, other):
    """(weights, states) pairs equal bit for bit."""
    for a, b in zip(result[0], other[0]):
        assert torch.equal(a, b)
    for table_states, other_states in zip(result[1], other[1]):
        for a, b in zip(table_states, other_states):
            assert torch.equal(a, b)


STEP_CASES = [
    dict(seed=0),
    dict(seed=1, weighted=True),
    dict(seed=2, pooling="mean", weighted=True),
    dict(seed=3, max_rows=3, max_bag=10),  # hot rows: long segments
    dict(seed=4, index_dtype=torch.int32, dims=[5, 16, 33]),
    # Unweighted sum pooling: the sort carries the gradient offsets; mixed pooling (the default) carries the bags,
    # per-sample weights the positions.
    dict(seed=5, pooling="sum"),
    dict(seed=6, pooling="sum", max_rows=3, max_bag=10),
    # The update sums a chunk of rows' gradients into a 4096-float buffer: a row wider than it is a chunk of its own
    # (on the heap, grown when a wider one follows), two 2050-float rows do not fit one chunk, narrow rows share one.
    dict(seed=8, num_tables=4, dims=[24, 4100, 2050, 7], max_rows=6),
    dict(seed=9, num_tables=2, dims=[4100, 5000], max_rows=4),
    # Each width the update has a loop of its own for, beside one it has not; then with long segments.
    dict(seed=10, num_tables=6, dims=[16, 32, 64, 128, 256, 48]),
    dict(seed=11, num_tables=6, dims=[16, 32, 64, 128, 256, 48], max_rows=3, max_bag=10),
]


@pytest.mark.parametrize("decay", DECAYS, ids=lambda d: d["weight_decay_mode"].name)
@pytest.mark.parametrize("case", STEP_CASES, ids=_case_id)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fused_backward_matches_reference_over_steps(isa, optimizer, case, decay):
    # A row's state adds up the squares of its D gradients in float32, in another order than the reference:
    # the rounding grows with D (the scalar kernel sums in one sequence).
    widest = max(case.get("dims", [64]))
    fp32_tol = dict(FP32_TOL, rtol=FP32_TOL["rtol"] * max(1.0, widest / 1024))
    for ref_dtype, tol in ((torch.float32, fp32_tol), (torch.float64, FP64_TOL)):
        _assert_steps_match(*_run_steps(optimizer, case, decay, ref_dtype=ref_dtype), ref_dtype=ref_dtype, **tol)


@pytest.mark.parametrize(
    "case",
    [dict(seed=7, weighted=True), dict(seed=12, num_tables=6, dims=[16, 32, 64, 128, 256, 48])],
    ids=["random_widths", "constant_widths"],
)
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fused_backward_16bit_weights(isa, optimizer, weight_dtype, case):
    weights, _, ref_weights, _ = _run_steps(optimizer, case, DECAYS[1], weight_dtype=weight_dtype)
    # Both sides round every update to 16 bits, from float32 vs float64
    # intermediates: they may differ by one unit in the last place.
    ulp = 2.0**-10 if weight_dtype == torch.float16 else 2.0**-7
    for w, rw in zip(weights, ref_weights):
        assert w.dtype == weight_dtype
        torch.testing.assert_close(w.double(), rw, atol=ulp, rtol=ulp)


NON_FINITE_CASES = [
    dict(seed=20),  # several features: tested in the copy into feature blocks
    dict(seed=21, num_tables=1, dims=[20]),  # one feature: grad_output read in place
    dict(seed=22, batch=1),  # one sample: read in place
    dict(seed=23, dims=[200, 3, 2050]),  # tails past the last vector
    dict(seed=24, batch=3, empty_bag_fraction=1.0),  # no occurrence: nothing reads the blocks
    dict(seed=25, batch=700),  # blocks of samples on both threads
]


@pytest.mark.parametrize("case", NON_FINITE_CASES, ids=_case_id)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fused_backward_refuses_a_non_finite_gradient_before_any_row(isa, optimizer, case):
    spec = OPTIMIZERS[optimizer]
    hyper = {**spec["hyper"], **DECAYS[1]}
    p = random_problem(**case)
    if case.get("num_tables") == 1:
        assert len(p.feature_table) == 1  # the case's premise
    g = torch.Generator().manual_seed(case["seed"])
    states = [[torch.rand(w.shape[0], generator=g) for w in p.weights] for _ in range(spec["states"])]
    size = p.batch * p.out_dim
    for bad in (float("nan"), float("inf"), float("-inf")):
        for position in {0, size - 1, int(torch.randint(size, (1,), generator=g))}:
            grad = torch.randn(p.batch, p.out_dim, generator=g)
            grad.view(-1)[position] = bad
            weights = p.clone_weights()
            stepped_states = [[s.clone() for s in table_states] for table_states in states]
            with pytest.raises(RuntimeError) as caught, _num_threads(2):
                _fused_step(optimizer, weights, stepped_states, p, grad, hyper)
            sample, column = divmod(position, p.out_dim)
            assert (
                f"grad_output holds NaN or inf ({bad} at sample {sample}, column {column}: feature slot "
            ) in str(caught.value)
            assert "no row was updated" in str(caught.value)
            for got, before in zip(weights, p.weights):
                assert torch.equal(got, before)
            for got_states, before_states in zip(stepped_states, states):
                for got, before in zip(got_states, before_states):
                    assert torch.equal(got, before)
    # Finite values whose sum overflows pass.
    _fused_step(optimizer, p.clone_weights(), states, p, torch.full((p.batch, p.out_dim), 3e38), hyper)


def test_momentum_scaled_equals_rowwise_adagrad_with_one_replica():
    """s = 1 and a sync after every step is exactly row-wise AdaGrad."""
    p0 = random_problem(21, weighted=True, max_rows=20)
    adagrad_weights, msrw_weights = p0.clone_weights(), p0.clone_weights()
    momentum1 = [torch.zeros(w.shape[0]) for w in adagrad_weights]
    m_sync = [torch.zeros(w.shape[0]) for w in msrw_weights]
    m_local = [torch.zeros(w.shape[0]) for w in msrw_weights]
    g = torch.Generator().manual_seed(3)
    for step in range(8):
        p = redraw_batch(p0, seed=step)
        grad = torch.randn(p.batch, p.out_dim, generator=g)
        args = (*p.layout, p.indices, p.offsets, p.per_sample_weights, grad)
        ops.embedding_bag_backward_rowwise_adagrad_(adagrad_weights, momentum1, *args, 0.1, 1e-8, 0.01, 1)
        ops.embedding_bag_backward_momentum_scaled_rowwise_adagrad_(msrw_weights, m_sync, m_local, *args, 0.1, 1e-8, 1.0, 0.01, 1)
        for s, d in zip(m_sync, m_local):  # the sync of a single replica
            s.add_(d)
            d.zero_()
    _assert_identical((adagrad_weights, [momentum1]), (msrw_weights, [m_sync]))


@contextlib.contextmanager
def _num_threads(n: int):
    """torch's intra-op thread count set to n, and restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# Tables of over 2^15 occurrences each. On 2 threads, three of about equal
# size are sorted one per thread (mixed pooling: the sort carries bags; sum
# pooling: gradient offsets; per-sample weights: positions); one alone is
# split over both.
LARGE_CASE = dict(seed=32, batch=2500, max_bag=40, max_rows=4000, dims=[8, 16, 4])
LARGE_SUM_CASE = dict(LARGE_CASE, seed=34, pooling="sum")
LARGE_WEIGHTED_CASE = dict(LARGE_CASE, seed=35, weighted=True)
ONE_LARGE_CASE = dict(seed=33, num_tables=1, batch=2500, max_bag=40, max_rows=4000, dims=[16], pooling="sum")
ONE_LARGE_MEAN_CASE = dict(ONE_LARGE_CASE, seed=36, pooling="mean")
ONE_LARGE_WEIGHTED_CASE = dict(ONE_LARGE_CASE, seed=37, weighted=True)


@pytest.mark.parametrize(
    "case",
    [LARGE_CASE, LARGE_SUM_CASE, LARGE_WEIGHTED_CASE, ONE_LARGE_CASE, ONE_LARGE_MEAN_CASE, ONE_LARGE_WEIGHTED_CASE],
    ids=["three", "three_sum", "three_weighted", "one", "one_mean", "one_weighted"],
)
def test_fused_backward_matches_reference_on_large_tables(case):
    with _num_threads(2):
        result = _run_steps("rowwise_adagrad", case, DECAYS[1], steps=2)
    _assert_steps_match(*result)


def test_fused_backward_matches_reference_on_rows_of_23_bits(isa):
    """A table of over 2^22 rows (a sort of three passes, an odd number:
    the sorted ids end in the scratch, which the segments are then read
    from), its ids repeating across the whole range of row bits, beside a
    table of 2^11 rows (one pass)."""
    g = torch.Generator().manual_seed(23)
    rows = [(1 << 22) + 7, 1 << 11]
    batch = 64
    hot = torch.tensor([0, 1, 255, 256, (1 << 11) - 1, 1 << 11, 1 << 16, (1 << 22) - 1, 1 << 22, rows[0] - 1])
    lengths = torch.randint(0, 9, (2 * batch,), generator=g)
    counts = lengths.view(2, batch).sum(1).tolist()
    big = torch.where(torch.rand(counts[0], generator=g) < 0.7, hot[torch.randint(0, len(hot), (counts[0],), generator=g)],
                      torch.randint(0, rows[0], (counts[0],), generator=g))  # fmt: skip
    offsets = torch.zeros(2 * batch + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    p = LookupProblem(
        weights=[torch.rand(r, 2, generator=g) * 2 - 1 for r in rows],
        feature_table=[0, 1],
        feature_pooling=[0, 0],
        feature_column=[0, 2],
        indices=torch.cat([big, torch.randint(0, rows[1], (counts[1],), generator=g)]),
        offsets=offsets,
        per_sample_weights=None,
        batch=batch,
    )
    hyper = {**OPTIMIZERS["rowwise_adagrad"]["hyper"], **DECAYS[0]}
    weights, ref_weights = p.clone_weights(), p.clone_weights(torch.float64)
    states = [[torch.rand(r, generator=g) for r in rows]]
    ref_states = [[s.double() for s in states[0]]]
    grad = torch.randn(batch, p.out_dim, generator=g)
    _fused_step("rowwise_adagrad", weights, states, p, grad, hyper)
    ref.fused_backward_ref("rowwise_adagrad", ref_weights, ref_states, p.layout, p.indices, p.offsets, None, grad,
                           dtype=torch.float64, **hyper)  # fmt: skip
    assert not torch.equal(weights[0][hot], p.weights[0][hot])  # the hot rows moved
    _assert_steps_match(weights, states, ref_weights, ref_states)


def _mixed_problem(seed: int, batch: int = 2000, big_bag: int = 40):
    """One table of about big_bag / 2 x 2000 ids, filled, sorted and
    segmented over both threads (of 2; in two chunks above 65536 ids),
    beside small ones done one per thread in each thread's own scratch: a
    table two features share, a table of one id, and a table no feature
    reads (2)."""
    g = torch.Generator().manual_seed(seed)
    rows, dims = [4000, 50, 30, 20], [16, 8, 4, 8]
    feature_table, feature_pooling, max_bag = [3, 0, 1, 1], [0, 0, 1, 0], [0, big_bag, 3, 2]
    lengths = torch.cat([torch.randint(0, m + 1, (batch,), generator=g) for m in max_bag])
    lengths[batch // 2] = 1  # table 3's one id
    counts = lengths.view(len(feature_table), batch).sum(1).tolist()
    ids = [torch.randint(0, rows[t], (n,), generator=g) for t, n in zip(feature_table, counts)]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return LookupProblem(
        weights=[torch.rand(r, d, generator=g) * 2 - 1 for r, d in zip(rows, dims)],
        feature_table=feature_table,
        feature_pooling=feature_pooling,
        feature_column=[0, 8, 24, 32],
        indices=torch.cat(ids),
        offsets=offsets,
        per_sample_weights=None,
        batch=batch,
    )


@pytest.mark.parametrize("big_bag", [40, 80], ids=["40K", "80K"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fused_steps_on_mixed_tables_match_reference_at_any_thread_count(optimizer, big_bag):
    hyper = {**OPTIMIZERS[optimizer]["hyper"], **DECAYS[1]}
    num_states = OPTIMIZERS[optimizer]["states"]
    tables = _mixed_problem(60, big_bag=big_bag).weights
    results = []
    for n in (1, 2):
        with _num_threads(n):
            weights = [w.clone() for w in tables]
            g = torch.Generator().manual_seed(61)
            states = [[torch.rand(len(w), generator=g) for w in weights] for _ in range(num_states)]
            ref_weights = [w.double() for w in weights]
            ref_states = [[s.double() for s in table_states] for table_states in states]
            for step in range(2):  # the second finds the first's scratch
                p = dataclasses.replace(_mixed_problem(62 + step, big_bag=big_bag), weights=weights)
                grad = torch.randn(p.batch, p.out_dim, generator=g)
                _fused_step(optimizer, weights, states, p, grad, hyper)
                ref_args = (p.layout, p.indices, p.offsets, None, grad)
                ref.fused_backward_ref(optimizer, ref_weights, ref_states, *ref_args, dtype=torch.float64, **hyper)
        _assert_steps_match(weights, states, ref_weights, ref_states)
        assert torch.equal(weights[2], tables[2])  # no feature reads it
        results.append((weights, states))
    _assert_identical(*results)


@pytest.mark.parametrize("big_bag", [40, 80], ids=["40K", "80K"])
def test_row_grad_on_mixed_tables_matches_reference_at_any_thread_count(big_bag):
    p = _mixed_problem(63, big_bag=big_bag)
    grad = torch.randn(p.batch, p.out_dim, generator=torch.Generator().manual_seed(64))
    ref_ids, ref_grads = ref.embedding_bag_backward_row_grad_ref(*p.op_args(), grad, dtype=torch.float64)
    results = []
    for n in (1, 2):
        with _num_threads(n):
            row_ids, row_grads = ops.embedding_bag_backward_row_grad(*p.op_args(), grad)
        assert [len(i) for i in row_ids] == [len(i) for i in ref_ids] and len(row_ids[2]) == 0
        for t in range(len(p.weights)):
            assert torch.equal(row_ids[t], ref_ids[t])
            torch.testing.assert_close(row_grads[t].double(), ref_grads[t], atol=1e-5, rtol=1e-5)  # float32 sums of ~20
        results.append(row_grads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", [LARGE_CASE, ONE_LARGE_CASE, "mixed"], ids=["three", "one", "mixed"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fused_backward_names_the_first_bad_id_and_changes_nothing(optimizer, case, threads):
    # Each table is filled and sorted by whichever thread takes it (largest
    # first; a table too large to balance, over both): bad ids in a late and
    # an early table, or two in one, still name the batch's first, no row or
    # state moves, and a good step after them matches the reference.
    with _num_threads(threads):
        p = _mixed_problem(70) if case == "mixed" else random_problem(**case)
        n = len(p.indices)
        hyper = {**OPTIMIZERS[optimizer]["hyper"], **DECAYS[1]}
        weights = p.clone_weights()
        states = [[torch.rand(w.shape[0]) for w in weights] for _ in range(OPTIMIZERS[optimizer]["states"])]
        saved_states = [[s.clone() for s in table_states] for table_states in states]
        grad = torch.randn(p.batch, p.out_dim)
        for positions in ([n - 1, n // 3], [n // 3 + 1, n - 2], [0, n // 2]):
            indices = p.indices.clone()
            indices[positions[0]] = -1
            indices[positions[1]] = 2**40
            first = min(positions)
            bad = dataclasses.replace(p, weights=weights, indices=indices)
            message = re.escape(f"id {int(indices[first])} at indices[{first}]")
            with pytest.raises(IndexError, match=message):
                _fused_step(optimizer, weights, states, bad, grad, hyper)
            with pytest.raises(IndexError, match=message):
                ops.embedding_bag_backward_row_grad(weights, *p.layout, indices, p.offsets, p.per_sample_weights, grad)
            for w, w0 in zip(weights, p.weights):
                assert torch.equal(w, w0)
            for table_states, saved in zip(states, saved_states):
                for s, s0 in zip(table_states, saved):
                    assert torch.equal(s, s0)
        ref_weights = [w.double() for w in weights]
        ref_states = [[s.double() for s in table_states] for table_states in states]
        _fused_step(optimizer, weights, states, dataclasses.replace(p, weights=weights), grad, hyper)
        ref_args = (p.layout, p.indices, p.offsets, p.per_sample_weights, grad)
        ref.fused_backward_ref(optimizer, ref_weights, ref_states, *ref_args, dtype=torch.float64, **hyper)
        _assert_steps_match(weights, states, ref_weights, ref_states)


@pytest.mark.parametrize(
    "case",
    [dict(seed=31, batch=300, max_bag=30, max_rows=500, dims=[16, 64, 128]), LARGE_CASE, LARGE_SUM_CASE, ONE_LARGE_CASE],
    ids=["small", "large", "large_sum", "one_large"],
)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_results_do_not_depend_on_thread_count(optimizer, case):
    results = []
    for n in (1, max(2, torch.get_num_threads())):
        with _num_threads(n):
            weights, states, _, _ = _run_steps(optimizer, case, DECAYS[1], steps=2, reference=False)
        results.append((weights, states))
    _assert_identical(*results)


def test_functional_forward_autograd_matches_reference():
    p = random_problem(41, weighted=True)
    weights = [w.clone().requires_grad_() for w in p.weights]
    psw = p.per_sample_weights.clone().requires_grad_()
    out = ops.embedding_bag_forward(weights, *p.layout, p.indices, p.offsets, psw)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [*weights, psw], grad)

    ref_weights = [w.double().requires_grad_() for w in p.weights]
    ref_psw = p.per_sample_weights.double().requires_grad_()
    expected_out = ref.embedding_bag_forward_ref(ref_weights, *p.layout, p.indices, p.offsets, ref_psw)
    expected = torch.autograd.grad(expected_out, [*ref_weights, ref_psw], grad.double())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, **FP64_TOL)


def test_hugepage_tensor_is_aligned_and_usable():
    x = eb.empty_hugepage((1 << 20, 4), torch.float32)
    assert x.shape == (1 << 20, 4) and x.dtype == torch.float32
    assert x.data_ptr() % (2 << 20) == 0
    x.fill_(3.0)
    assert float(x.sum()) == 3.0 * 4 * (1 << 20)
    small = eb.empty_hugepage((3,), torch.float16)
    assert small.shape == (3,) and small.dtype == torch.float16
