"""The fused dot interaction against its plain-PyTorch reference (and a
loop-simple oracle), in every CPU build this machine runs, forward and
backward, with bad input refused clearly."""

import pytest
import torch

from dist_rec.ops.interaction import dot_interaction, dot_interaction_reference

ops = torch.ops.dist_rec
SHAPES = [  # (batch, features, dim)
    (7, 26, 16),  # the README job's shape
    (33, 3, 5),  # dim not a multiple of any vector width
    (9, 40, 33),  # more vectors than a chunk of lanes, odd dim
    (1, 1, 1),
    (0, 3, 4),  # empty batch
    (5, 0, 8),  # no sparse features: the dense vector alone
    (64, 7, 24),  # a batch the op splits into several tasks
]


def pairs_by_loops(dense, sparse):
    """Oracle: the dense row, then <v_i, v_j> for i < j, one sample at a time."""
    batch, dim = dense.shape
    rows = []
    for b in range(batch):
        vectors = [dense[b]] + list(sparse[b].view(-1, dim))
        dots = [torch.dot(vectors[i], vectors[j]) for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
        rows.append(torch.cat([dense[b], torch.stack(dots) if dots else dense.new_zeros(0)]))
    return torch.stack(rows) if rows else dense.new_zeros(0, dim + (sparse.shape[1] // dim + 1) * (sparse.shape[1] // dim) // 2)


@pytest.fixture(params=ops._supported_cpu_isas())
def isa(request):
    ops._set_cpu_isa(request.param)
    yield request.param
    ops._set_cpu_isa("")  # back to the best build for this CPU


def _inputs(seed, batch, features, dim, dtype):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, dim, generator=g, dtype=dtype, requires_grad=True)
    sparse = torch.randn(batch, features * dim, generator=g, dtype=dtype, requires_grad=True)
    return dense, sparse


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_forward_and_backward(isa, seed, shape, dtype):
    dense, sparse = _inputs(seed, *shape, dtype)
    out = dot_interaction(dense, sparse)
    expected = dot_interaction_reference(dense, sparse)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(out.detach(), pairs_by_loops(dense.detach(), sparse.detach()), **tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=dtype)
    got = torch.autograd.grad(out, (dense, sparse), grad, allow_unused=True)
    want = torch.autograd.grad(expected, (dense, sparse), grad, allow_unused=True)
    for g_got, g_want, x in zip(got, want, (dense, sparse)):
        torch.testing.assert_close(
            g_got if g_got is not None else torch.zeros_like(x), g_want if g_want is not None else torch.zeros_like(x), **tol
        )


def test_gradcheck_float64(isa):
    dense, sparse = _inputs(3, 4, 3, 5, torch.float64)
    assert torch.autograd.gradcheck(dot_interaction, (dense, sparse))


def test_strided_rows_and_3d_sparse():
    """A view with padded rows (a KeyedTensor's column slice) and the
    ``[B, F, D]`` form give the same result as contiguous input."""
    dense, sparse = _inputs(4, 6, 4, 8, torch.float32)
    wide = torch.randn(6, 4 * 8 + 5)
    wide[:, 5:] = sparse.detach()
    view = wide[:, 5:]
    assert not view.is_contiguous()
    torch.testing.assert_close(dot_interaction(dense, view), dot_interaction(dense, sparse))
    torch.testing.assert_close(dot_interaction(dense, sparse.view(6, 4, 8)), dot_interaction(dense, sparse))
    transposed = dense.detach().t().contiguous().t()  # column stride != 1
    torch.testing.assert_close(dot_interaction(transposed, sparse), dot_interaction(dense, sparse))


def test_builds_agree_bit_for_bit_in_float64():
    """Every ISA build runs float64 through the same loops: identical bits."""
    dense, sparse = _inputs(5, 17, 26, 16, torch.float64)
    results = []
    try:
        for isa in ops._supported_cpu_isas():
            ops._set_cpu_isa(isa)
            results.append(ops.dot_interaction(dense.detach(), sparse.detach()))
    finally:
        ops._set_cpu_isa("")
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_half_precision_runs_the_reference():
    dense, sparse = _inputs(6, 3, 2, 4, torch.float32)
    out = dot_interaction(dense.detach().bfloat16(), sparse.detach().bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dot_interaction(dense, sparse).detach(), rtol=0.05, atol=0.05)


def test_opcheck():
    dense, sparse = _inputs(7, 5, 3, 4, torch.float32)
    torch.library.opcheck(ops.dot_interaction.default, (dense, sparse))
    grad = torch.randn(5, 4 + 6)
    torch.library.opcheck(ops.dot_interaction_backward.default, (grad, dense.detach(), sparse.detach()))


@pytest.mark.parametrize(
    "dense,sparse,error,message",
    [
        (torch.zeros(4, 3), torch.zeros(4, 7), ValueError, "not a multiple of the embedding dim 3"),
        (torch.zeros(4, 3), torch.zeros(5, 6), ValueError, "sparse has 5 rows but dense has 4"),
        (torch.zeros(4, 3), torch.zeros(4, 6, dtype=torch.float64), TypeError, "sparse must have dense's dtype"),
        (torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, 6, dtype=torch.int64), TypeError, "float32 or float64"),
        (torch.zeros(4, 0), torch.zeros(4, 0), ValueError, "at least one column"),
    ],
)
def test_bad_input_is_refused_by_the_op(dense, sparse, error, message):
    with pytest.raises(error, match=message):
        ops.dot_interaction(dense, sparse)


def test_bad_input_is_refused_by_the_function():
    with pytest.raises(ValueError, match=r"dense must be \[B, D\]"):
        dot_interaction(torch.zeros(4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="D=5 but dense has D=3"):
        dot_interaction(torch.zeros(4, 3), torch.zeros(4, 2, 5))
    with pytest.raises(ValueError, match=r"grad_output must have shape \[4, 6\]"):
        ops.dot_interaction_backward(torch.zeros(4, 7), torch.zeros(4, 3), torch.zeros(4, 6))
