"""The CUDA kernels against the CPU kernels and the references: the CPU
suite's cases, run on ``cuda``. Skipped where there is no GPU (CI has none;
benchmarks/gpu_check.sh runs this file on a lent GPU)."""

import re

import pytest
import torch

import dist_rec.ops  # noqa: F401
from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.ops import reference as ref
from dist_rec.optim import MomentumScaledRowWiseAdagrad, RowWiseAdagrad, SGD
from dist_rec.testing.random_problems import LookupProblem, random_problem, redraw_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ops = torch.ops.dist_rec
CUDA = torch.device("cuda")
# Same float32 arithmetic, other summation orders (warp groups, pieces of hot
# rows, warp reductions): a few float32 roundings apart.
FP32_TOL = dict(atol=1e-6, rtol=1e-6)
FP64_TOL = dict(atol=1e-5, rtol=1e-5)


def on(p: LookupProblem, device) -> LookupProblem:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return LookupProblem(
        weights=[w.to(device) for w in p.weights],
        feature_table=p.feature_table,
        feature_pooling=p.feature_pooling,
        feature_column=p.feature_column,
        indices=move(p.indices),
        offsets=move(p.offsets),
        per_sample_weights=move(p.per_sample_weights),
        batch=p.batch,
    )


CASES = [
    dict(seed=0),
    dict(seed=1),
    dict(seed=2, weighted=True),
    dict(seed=3, weighted=True, pooling="mean"),
    dict(seed=4, index_dtype=torch.int32),
    dict(seed=5, batch=0),
    dict(seed=6, batch=1, empty_bag_fraction=1.0),
    dict(seed=7, max_rows=2, max_bag=12),
    dict(seed=8, dims=[200, 3, 250]),  # odd widths: 4-byte loads
    dict(seed=9, dims=[64, 128, 32], batch=40, max_bag=30),
]


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_cpu_and_reference(case):
    p = random_problem(**case)
    cpu = ops.embedding_bag_forward(*p.op_args())
    gpu = ops.embedding_bag_forward(*on(p, CUDA).op_args())
    torch.testing.assert_close(gpu.cpu(), cpu, **FP32_TOL)
    torch.testing.assert_close(gpu.cpu().double(), ref.embedding_bag_forward_ref(*p.op_args()), **FP64_TOL)


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_16bit(weight_dtype, seed):
    p = random_problem(seed, weight_dtype=weight_dtype, weighted=seed == 1, dims=[8, 16, 64])
    gpu = ops.embedding_bag_forward(*on(p, CUDA).op_args())
    torch.testing.assert_close(gpu.cpu(), ops.embedding_bag_forward(*p.op_args()), **FP32_TOL)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_row_grad_matches_cpu(case):
    p = random_problem(**case)
    grad = torch.randn(p.batch, p.out_dim, generator=torch.Generator().manual_seed(case["seed"]))
    cpu_ids, cpu_grads = ops.embedding_bag_backward_row_grad(*p.op_args(), grad)
    gpu_ids, gpu_grads = ops.embedding_bag_backward_row_grad(*on(p, CUDA).op_args(), grad.to(CUDA))
    for a, b, c, d in zip(cpu_ids, gpu_ids, cpu_grads, gpu_grads):
        assert torch.equal(a, b.cpu())
        torch.testing.assert_close(d.cpu(), c, **FP32_TOL)


@pytest.mark.parametrize("case", CASES[:5], ids=case_id)
def test_per_sample_weights_grad_matches_reference(case):
    p = random_problem(**case)
    grad = torch.randn(p.batch, p.out_dim, generator=torch.Generator().manual_seed(1))
    g = on(p, CUDA)
    out = ops.embedding_bag_per_sample_weights_grad(g.weights, *g.layout, g.indices, g.offsets, grad.to(CUDA))
    expected = ref.embedding_bag_per_sample_weights_grad_ref(p.weights, *p.layout, p.indices, p.offsets, grad)
    torch.testing.assert_close(out.cpu().double(), expected, **FP64_TOL)


OPTIMIZERS = ["sgd", "rowwise_adagrad", "momentum_scaled_rowwise_adagrad"]


def fused_step(optimizer, weights, states, p, grad, decay_mode):
    args = (*p.layout, p.indices, p.offsets, p.per_sample_weights, grad)
    if optimizer == "sgd":
        ops.embedding_bag_backward_sgd_(weights, *args, 0.1, 0.02, decay_mode)
    elif optimizer == "rowwise_adagrad":
        ops.embedding_bag_backward_rowwise_adagrad_(weights, states[0], *args, 0.1, 1e-8, 0.02, decay_mode)
    else:
        ops.embedding_bag_backward_momentum_scaled_rowwise_adagrad_(
            weights, states[0], states[1], *args, 0.1, 1e-8, 1.7, 0.02, decay_mode
        )


@pytest.mark.parametrize("decay_mode", [0, 1, 2])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[7], CASES[9]], ids=case_id)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fused_steps_match_cpu(optimizer, case, decay_mode):
    p0 = random_problem(**case)
    cpu_w, gpu_w = p0.clone_weights(), [w.to(CUDA) for w in p0.weights]
    g = torch.Generator().manual_seed(7)
    cpu_s = [[torch.rand(w.shape[0], generator=g) for w in cpu_w] for _ in range(2)]
    gpu_s = [[s.to(CUDA) for s in states] for states in cpu_s]
    for step in range(6):
        p = redraw_batch(p0, seed=100 + step, max_bag=case.get("max_bag", 6))
        grad = torch.randn(p.batch, p.out_dim, generator=g)
        p.weights = cpu_w
        fused_step(optimizer, cpu_w, cpu_s, p, grad, decay_mode)
        gp = on(p, CUDA)
        gp.weights = gpu_w
        fused_step(optimizer, gpu_w, gpu_s, gp, grad.to(CUDA), decay_mode)
    for a, b in zip(cpu_w, gpu_w):
        torch.testing.assert_close(b.cpu(), a, **FP32_TOL)
    for sa, sb in zip(cpu_s, gpu_s):
        for a, b in zip(sa, sb):
            torch.testing.assert_close(b.cpu(), a, **FP32_TOL)


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
def test_fused_steps_16bit_within_rounding(weight_dtype):
    p0 = random_problem(11, weight_dtype=weight_dtype, dims=[8, 16, 64], weighted=True)
    cpu_w, gpu_w = p0.clone_weights(), [w.to(CUDA) for w in p0.weights]
    cpu_m = [torch.zeros(w.shape[0]) for w in cpu_w]
    gpu_m = [m.to(CUDA) for m in cpu_m]
    g = torch.Generator().manual_seed(3)
    for step in range(5):
        p = redraw_batch(p0, seed=step)
        grad = torch.randn(p.batch, p.out_dim, generator=g)
        p.weights = cpu_w
        ops.embedding_bag_backward_rowwise_adagrad_(cpu_w, cpu_m, *p.layout, p.indices, p.offsets, p.per_sample_weights, grad, 0.1, 1e-8, 0.0, 0)
        gp = on(p, CUDA)
        ops.embedding_bag_backward_rowwise_adagrad_(
            gpu_w, gpu_m, *gp.layout, gp.indices, gp.offsets, gp.per_sample_weights, grad.to(CUDA), 0.1, 1e-8, 0.0, 0
        )
    # Each update is rounded to 16 bits on both sides from float32 values that
    # may differ in the last bit: one unit in the last place apart at most.
    ulp = 2.0**-10 if weight_dtype == torch.float16 else 2.0**-7
    for a, b in zip(cpu_w, gpu_w):
        torch.testing.assert_close(b.cpu().double(), a.double(), atol=ulp, rtol=ulp)


def test_hot_rows_take_the_piecewise_path_and_match_cpu():
    # 3 rows, ~3000 occurrences each: segments far longer than one piece.
    p0 = random_problem(12, max_rows=3, dims=[128, 64, 32], batch=500, max_bag=12)
    grad = torch.randn(p0.batch, p0.out_dim, generator=torch.Generator().manual_seed(0))
    cpu_ids, cpu_grads = ops.embedding_bag_backward_row_grad(*p0.op_args(), grad)
    gpu_ids, gpu_grads = ops.embedding_bag_backward_row_grad(*on(p0, CUDA).op_args(), grad.to(CUDA))
    for a, b in zip(cpu_grads, gpu_grads):
        # Long sums in another order: relative to the sum's magnitude.
        torch.testing.assert_close(b.cpu(), a, atol=1e-5 * float(a.abs().max()), rtol=1e-5)


def test_results_are_deterministic():
    p = on(random_problem(13, max_rows=5, batch=300, max_bag=20, dims=[32, 64, 128]), CUDA)
    grad = torch.randn(p.batch, p.out_dim, device=CUDA)
    runs = []
    for _ in range(3):
        weights = [w.clone() for w in p.weights]
        momentum = [torch.zeros(w.shape[0], device=CUDA) for w in weights]
        ops.embedding_bag_backward_rowwise_adagrad_(weights, momentum, *p.layout, p.indices, p.offsets, None, grad, 0.1, 1e-8, 0.0, 0)
        runs.append(weights)
    for w in runs[1:]:
        for a, b in zip(runs[0], w):
            assert torch.equal(a, b)


def test_bad_ids_raise_the_cpu_message():
    p = random_problem(14, batch=4)
    bad = p.indices.clone()
    bad[3] = 10_000
    p.indices = bad
    with pytest.raises(IndexError) as cpu_error:
        ops.embedding_bag_forward(*p.op_args())
    # The same diagnosis after the op's name.
    message = str(cpu_error.value).split("\n")[0].split(": ", 1)[1]
    for call in (
        lambda g: ops.embedding_bag_forward(*g.op_args()),
        lambda g: ops.embedding_bag_backward_row_grad(*g.op_args(), torch.zeros(g.batch, g.out_dim, device=CUDA)),
    ):
        with pytest.raises(IndexError, match=re.escape(message)):
            call(on(p, CUDA))
    # The process and the device are still usable afterwards.
    assert float(ops.embedding_bag_forward(*on(random_problem(15), CUDA).op_args()).sum().cpu()) == pytest.approx(
        float(ops.embedding_bag_forward(*random_problem(15).op_args()).sum()), rel=1e-5
    )


def test_rows_too_wide_for_the_backward_are_refused_clearly():
    # An odd width forces 4-byte loads; a lane then holds at most 8 columns.
    p = on(random_problem(18, num_tables=2, dims=[3, 1000]), CUDA)
    momentum = [torch.zeros(w.shape[0], device=CUDA) for w in p.weights]
    grad = torch.zeros(p.batch, p.out_dim, device=CUDA)
    with pytest.raises(ValueError, match=r"the CUDA backward supports rows up to 256 elements for these tables; the widest has 1000"):
        ops.embedding_bag_backward_rowwise_adagrad_(
            p.weights, momentum, *p.layout, p.indices, p.offsets, None, grad, 0.1, 1e-8, 0.0, 0
        )


def test_bad_offsets_raise():
    p = random_problem(16, batch=4)
    offsets = p.offsets.clone()
    offsets[2], offsets[3] = offsets[3] + 1, offsets[2]
    p.offsets = offsets
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        ops.embedding_bag_forward(*on(p, CUDA).op_args())


def test_opcheck_on_cuda():
    p = on(random_problem(17, weighted=True, batch=5), CUDA)
    torch.library.opcheck(ops.embedding_bag_forward.default, p.op_args())
    grad = torch.randn(p.batch, p.out_dim, device=CUDA)
    momentum = [torch.rand(w.shape[0], device=CUDA) for w in p.weights]
    torch.library.opcheck(
        ops.embedding_bag_backward_rowwise_adagrad_.default,
        ([w.clone() for w in p.weights], momentum, *p.layout, p.indices, p.offsets, p.per_sample_weights, grad, 0.1, 1e-8, 0.0, 0),
    )
    torch.library.opcheck(ops.embedding_bag_backward_row_grad.default, (*p.op_args(), grad))


@pytest.mark.parametrize(
    "make", [lambda: RowWiseAdagrad(lr=0.1), lambda: SGD(lr=0.1), lambda: MomentumScaledRowWiseAdagrad(lr=0.1, momentum_scale=2.0)]
)
def test_module_trains_the_same_on_cuda(make):
    tables = [
        EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=50, feature_names=["f0", "f1"]),
        EmbeddingBagConfig(name="t1", embedding_dim=32, num_embeddings=20, feature_names=["f2"]),
    ]
    torch.manual_seed(0)
    cpu = EmbeddingBagCollection(tables=tables, optimizer=make())
    gpu = EmbeddingBagCollection(tables=tables, optimizer=make(), device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        lengths = torch.randint(0, 4, (3 * 8,), generator=g)
        values = torch.randint(0, 20, (int(lengths.sum()),), generator=g)
        kjt = KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2"], values, lengths)
        grad = torch.randn(8, 64, generator=g)
        cpu(kjt).values().backward(grad)
        gpu(kjt.to(CUDA)).values().backward(grad.to(CUDA))
    for name in ("t0", "t1"):
        torch.testing.assert_close(gpu.embedding_bags[name].weight.cpu(), cpu.embedding_bags[name].weight, **FP32_TOL)
