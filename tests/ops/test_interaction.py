"""The fused dot interaction against its plain-PyTorch reference (and a
loop-simple oracle), in every CPU build this machine runs, forward and
backward, with bad input refused clearly; its blocks form (features read
where a sharded lookup receives them) against the same."""

import pytest
import torch

from dist_rec.ops.interaction import (
    dot_interaction,
    dot_interaction_blocks,
    dot_interaction_blocks_reference,
    dot_interaction_reference,
)

ops = torch.ops.dist_rec
SHAPES = [  # (batch, features, dim)
    (7, 26, 16),  # the README job's shape
    (33, 3, 5),  # dim not a multiple of any vector width
    (9, 40, 33),  # more vectors than a chunk of lanes, odd dim
    (1, 1, 1),
    (0, 3, 4),  # empty batch
    (5, 0, 8),  # no sparse features: the dense vector alone
    (64, 7, 24),  # a batch the op splits into several tasks
    (6, 26, 64),  # the multihot presets' shape: whole register blocks, rows read and written in place
    (4, 5, 40),  # the backward's five column vectors (AVX2): a block of four, then one
    (5, 4, 22),  # the backward's three column vectors, through the buffers (AVX2); 22 one-float columns (scalar)
    (3, 12, 16),  # a forward two column vectors wide (AVX2: 13 vectors)
    (3, 20, 8),  # a forward three column vectors wide (AVX2: 21 vectors)
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


def _assert_same_gradients(out, expected, inputs, seed, tol):
    """Both outputs' gradients w.r.t. ``inputs`` under one random upstream gradient."""
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=out.dtype)
    got = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    want = torch.autograd.grad(expected, inputs, grad, allow_unused=True)
    for g_got, g_want, x in zip(got, want, inputs):
        torch.testing.assert_close(
            g_got if g_got is not None else torch.zeros_like(x), g_want if g_want is not None else torch.zeros_like(x), **tol
        )


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
    _assert_same_gradients(out, expected, (dense, sparse), seed, tol)


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


# -- blocks form ---------------------------------------------------------------


def _block_layout(seed, batch, features, dim, blocks, gap):
    """A random blocks layout: features dealt to ``blocks`` blocks in a
    shuffled order, each block's features at shuffled column positions,
    ``gap`` unused columns after each feature (0: the blocks are covered)."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, blocks, (features,), generator=g).tolist()
    feature_block, feature_column, widths = [0] * features, [0] * features, [0] * blocks
    for r in range(blocks):
        mine = [f for f in range(features) if owner[f] == r]
        for position, f in enumerate(torch.randperm(len(mine), generator=g).tolist()):
            feature_block[mine[f]], feature_column[mine[f]] = r, position * (dim + gap)
        widths[r] = len(mine) * (dim + gap)
    return widths, feature_block, feature_column


BLOCK_SHAPES = [  # (batch, features, dim, blocks, gap)
    (7, 26, 16, 2, 0),  # the README job on 2 ranks, table-wise
    (9, 26, 16, 4, 0),
    (5, 3, 5, 3, 2),  # odd dim, uncovered columns (zero gradient there)
    (0, 4, 4, 2, 0),  # empty batch
    (6, 0, 8, 2, 0),  # no sparse features
    (4, 2, 4, 4, 0),  # more blocks than features: empty blocks
    (64, 7, 24, 2, 1),
    (5, 26, 64, 2, 0),  # the sharded multihot preset's layout
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", BLOCK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocks_match_reference_forward_and_backward(isa, seed, shape, dtype):
    batch, features, dim, blocks, gap = shape
    widths, feature_block, feature_column = _block_layout(seed, batch, features, dim, blocks, gap)
    g = torch.Generator().manual_seed(seed + 10)
    dense = torch.randn(batch, dim, generator=g, dtype=dtype, requires_grad=True)
    values = torch.randn(batch * sum(widths), generator=g, dtype=dtype, requires_grad=True)
    layout = (widths, feature_block, feature_column)
    out = dot_interaction_blocks(dense, values, *layout)
    expected = dot_interaction_blocks_reference(dense, values, *layout)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, **tol)
    _assert_same_gradients(out, expected, (dense, values), seed, tol)


def test_blocks_equal_the_joined_form_bit_for_bit(isa):
    """Same vectors, same loops: reading them in blocks changes no bit."""
    widths, feature_block, feature_column = _block_layout(3, 11, 26, 16, 2, 0)
    dense = torch.randn(11, 16)
    values = torch.randn(11 * sum(widths))
    blocks = [b.view(11, w) for b, w in zip(torch.split(values, [11 * w for w in widths]), widths)]
    joined = torch.cat([blocks[r][:, c : c + 16] for r, c in zip(feature_block, feature_column)], dim=1)
    assert torch.equal(
        ops.dot_interaction_blocks(dense, values, widths, feature_block, feature_column), ops.dot_interaction(dense, joined)
    )


@pytest.mark.parametrize("dim, gap", [(16, 0), (24, 1), (22, 0)])
def test_blocks_backward_equals_the_joined_form_bit_for_bit(isa, dim, gap):
    """The backward too, where rows are read and written in place (whole
    vectors: 16, and 24 with gaps between features, on AVX2) and through
    buffers (22 floats)."""
    batch, features = 9, 26
    widths, feature_block, feature_column = _block_layout(4, batch, features, dim, 2, gap)
    dense = torch.randn(batch, dim)
    values = torch.randn(batch * sum(widths))
    grad = torch.randn(batch, dim + (features + 1) * features // 2)
    blocks = [b.view(batch, w) for b, w in zip(torch.split(values, [batch * w for w in widths]), widths)]
    joined = torch.cat([blocks[r][:, c : c + dim] for r, c in zip(feature_block, feature_column)], dim=1)
    grad_dense, grad_values = ops.dot_interaction_blocks_backward(grad, dense, values, widths, feature_block, feature_column)
    want_dense, want_joined = ops.dot_interaction_backward(grad, dense, joined)
    assert torch.equal(grad_dense, want_dense)
    got_blocks = [b.view(batch, w) for b, w in zip(torch.split(grad_values, [batch * w for w in widths]), widths)]
    got_joined = torch.cat([got_blocks[r][:, c : c + dim] for r, c in zip(feature_block, feature_column)], dim=1)
    assert torch.equal(got_joined, want_joined)


def test_blocks_gradcheck_and_opcheck():
    widths, feature_block, feature_column = [7, 4], [1, 0], [0, 3]  # columns 0-2 of block 0 unused
    dense = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    values = torch.randn(3 * 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda d, v: dot_interaction_blocks(d, v, widths, feature_block, feature_column), (dense, values)
    )
    torch.library.opcheck(ops.dot_interaction_blocks.default, (dense.float(), values.float(), widths, feature_block, feature_column))
    grad = torch.randn(3, 4 + 3)
    torch.library.opcheck(
        ops.dot_interaction_blocks_backward.default,
        (grad, dense.detach().float(), values.detach().float(), widths, feature_block, feature_column),
    )


@pytest.mark.parametrize(
    "numel,layout,error,message",
    [
        (20, ([4, 4], [0, 1], [0, 0]), ValueError, "values has 20 elements but 2 blocks of widths"),
        (24, ([4, 4], [0, 2], [0, 0]), IndexError, "feature 1 is in block 2; there are 2 blocks"),
        (24, ([4, 4], [0, 1], [0, 2]), IndexError, r"feature 1 takes columns \[2, 6\) of block 1, which has 4 columns"),
        (24, ([8, 0], [0, 0], [0, 3]), ValueError, "features 0 and 1 overlap in block 0"),
        (24, ([4, 4], [0], [0, 0]), ValueError, "feature_block has 1 entries but feature_column has 2"),
        (24, ([4, -4, 4], [0, 2], [0, 0]), ValueError, r"block_widths\[1\] is -4"),
    ],
)
def test_bad_blocks_are_refused(numel, layout, error, message):
    with pytest.raises(error, match=message):
        ops.dot_interaction_blocks(torch.zeros(3, 4), torch.zeros(numel), *layout)
    with pytest.raises(TypeError, match="values must have dense's dtype"):
        ops.dot_interaction_blocks(torch.zeros(3, 4), torch.zeros(24, dtype=torch.float64), [4, 4], [0, 1], [0, 0])
