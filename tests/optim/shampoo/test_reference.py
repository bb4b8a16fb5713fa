"""Sanity tests of the Shampoo reference itself (tests/optim/shampoo/reference.py):
blocking, one-step closed forms, grafting norms, weight decay, momentum, inverse roots."""

import pytest
import torch

import shampoo_reference as ref

ReferenceShampoo = ref.ReferenceShampoo

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


def _sym_power(M, power):
    """M^power for a symmetric positive definite M (eigendecomposition, no shift)."""
    l, Q = torch.linalg.eigh(M)
    return Q @ torch.diag(l**power) @ Q.T


# ------------------------------------------------------------------------- blocking


def test_blocks_merge_examples_from_doc():
    blocks, merged = ref.blocks_of((2, 3, 5), 8)
    assert merged == (6, 5)
    assert blocks == [((0, 6), (0, 5))]
    blocks, merged = ref.blocks_of((8, 2), 8)
    assert merged == (8, 2)
    assert blocks == [((0, 8), (0, 2))]


def test_blocks_squeeze():
    assert ref.blocks_of((1, 3, 1, 4), 8) == ([((0, 3), (0, 4))], (3, 4))
    assert ref.blocks_of((1, 3, 1, 4), 12) == ([((0, 12),)], (12,))
    assert ref.blocks_of((7, 1), 1024) == ([((0, 7),)], (7,))


def test_blocks_split_with_shorter_last_piece():
    blocks, merged = ref.blocks_of((5, 7), 4)
    assert merged == (5, 7)
    assert blocks == [((0, 4), (0, 4)), ((0, 4), (4, 7)), ((4, 5), (0, 4)), ((4, 5), (4, 7))]
    # a large first dimension is split, and a small one after it is not merged into it
    blocks, merged = ref.blocks_of((10, 2), 4)
    assert merged == (10, 2)
    assert blocks == [((0, 4), (0, 2)), ((4, 8), (0, 2)), ((8, 10), (0, 2))]


def test_blocks_one_element_is_0d():
    assert ref.blocks_of((1, 1, 1), 8) == ([()], ())
    assert ref.blocks_of((1,), 8) == ([()], ())
    assert ref.blocks_of((), 8) == ([()], ())


def test_root_order():
    assert ref.root_order(2, 0) == 4
    assert ref.root_order(3, 0) == 6
    assert ref.root_order(2, 2) == 2
    assert ref.root_order(1, [3, 0]) == 3
    assert ref.root_order(2, [3, 0]) == 4  # an entry of 0 keeps 2k
    assert ref.root_order(3, [3, 0]) == 6  # an order beyond the list keeps 2k


# ------------------------------------------------------------------- inverse root


def test_inverse_root_shifts_negative_eigenvalue():
    Q, _ = torch.linalg.qr(_randn(3, 3, seed=1))
    l = torch.tensor([-2.0, 1.0, 3.0], dtype=F64)
    A = Q @ torch.diag(l) @ Q.T
    A = (A + A.T) / 2
    eps = 1e-3
    root = ref.inverse_root(A, 4, eps)
    expected = Q @ torch.diag((l + 2.0 + eps) ** (-0.25)) @ Q.T
    torch.testing.assert_close(root, expected, rtol=1e-10, atol=1e-10)


def test_inverse_root_no_shift_for_positive_eigenvalues():
    Q, _ = torch.linalg.qr(_randn(3, 3, seed=2))
    l = torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    A = Q @ torch.diag(l) @ Q.T
    A = (A + A.T) / 2
    root = ref.inverse_root(A, 2, 1e-3)
    expected = Q @ torch.diag((l + 1e-3) ** (-0.5)) @ Q.T
    torch.testing.assert_close(root, expected, rtol=1e-10, atol=1e-10)


def test_inverse_root_failure_keeps_previous_root_and_counts():
    p = _randn(3, 4, seed=3)
    opt = ReferenceShampoo([p], lr=0.1, betas=(0.0, 1.0), grafting="none", max_preconditioner_dim=4)
    opt.step([_randn(3, 4, seed=4)])
    roots = [R.clone() for R in opt.state[0]["blocks"][0]["R"]]
    assert opt.root_failures == 0
    bad = _randn(3, 4, seed=5)
    bad[0, 0] = float("nan")
    opt.step([bad])
    assert opt.root_failures == 2  # both factors now hold a NaN
    for R, R_before in zip(opt.state[0]["blocks"][0]["R"], roots):
        torch.testing.assert_close(R, R_before, rtol=0, atol=0)


# ------------------------------------------------------------------ one-step forms


@pytest.mark.parametrize("eps", [1e-12, 1e-3])
def test_one_step_matrix_closed_form(eps):
    p0 = _randn(3, 4, seed=10)
    G = _randn(3, 4, seed=11)
    lr = 0.1
    p = p0.clone()
    # max_preconditioner_dim = 4: 3 * 4 > 4, so (3, 4) is not merged into (12,) and is one 2-d block
    opt = ReferenceShampoo(
        [p],
        lr=lr,
        betas=(0.0, 1.0),
        epsilon=eps,
        grafting="none",
        precondition_frequency=1,
        start_preconditioning_step=1,
        max_preconditioner_dim=4,
    )
    assert opt.state[0]["merged_shape"] == (3, 4) and len(opt.state[0]["blocks"]) == 1
    opt.step([G])
    L = _sym_power(G @ G.T + eps * torch.eye(3, dtype=F64), -0.25)
    Rt = _sym_power(G.T @ G + eps * torch.eye(4, dtype=F64), -0.25)
    torch.testing.assert_close(p, p0 - lr * (L @ G @ Rt), rtol=1e-8, atol=1e-8)
    # the same through the SVD G = U diag(s) V^T: the step is U diag(s / sqrt(s^2 + eps)) V^T
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(p, p0 - lr * (U @ torch.diag(s / torch.sqrt(s**2 + eps)) @ Vh), rtol=1e-8, atol=1e-8)


def test_small_matrix_is_merged_into_a_vector():
    # with the default max 1024, (3, 4) merges into (12,): one order-1 block, r = 2
    p0 = _randn(3, 4, seed=14)
    G = _randn(3, 4, seed=15)
    eps = 1e-3
    p = p0.clone()
    opt = ReferenceShampoo([p], lr=1.0, betas=(0.0, 1.0), epsilon=eps, grafting="none")
    assert opt.state[0]["merged_shape"] == (12,)
    opt.step([G])
    g = G.reshape(12)
    expected = p0 - (_sym_power(torch.outer(g, g) + eps * torch.eye(12, dtype=F64), -0.5) @ g).reshape(3, 4)
    torch.testing.assert_close(p, expected, rtol=1e-10, atol=1e-10)


def test_one_step_vector_uses_square_root():
    p0 = _randn(5, seed=12)
    g = _randn(5, seed=13)
    eps = 1e-3
    p = p0.clone()
    opt = ReferenceShampoo([p], lr=1.0, betas=(0.0, 1.0), epsilon=eps, grafting="none")
    opt.step([g])
    expected = p0 - _sym_power(torch.outer(g, g) + eps * torch.eye(5, dtype=F64), -0.5) @ g
    torch.testing.assert_close(p, expected, rtol=1e-10, atol=1e-10)


def test_sgd_grafting_step_norm():
    # several blocks, order 2 and one 3-d parameter; each block's step has norm lr ||G_block||
    shapes = [(5, 7), (3, 4, 2)]
    params = [_randn(*s, seed=20 + j) for j, s in enumerate(shapes)]
    before = [p.clone() for p in params]
    grads = [_randn(*s, seed=30 + j) for j, s in enumerate(shapes)]
    lr = 0.05
    opt = ReferenceShampoo(params, lr=lr, betas=(0.0, 1.0), grafting="sgd", max_preconditioner_dim=4)
    opt.step(grads)
    for p, p_before, g in zip(params, before, grads):
        step = p_before - p
        assert torch.linalg.vector_norm(step).item() == pytest.approx(
            lr * torch.linalg.vector_norm(g).item(), rel=1e-10
        )
        # and the direction is not just the gradient
        assert not torch.allclose(step, lr * g, rtol=1e-3, atol=1e-3)
    # per block too
    blocks, merged = ref.blocks_of((5, 7), 4)
    step = (before[0] - params[0]).reshape(merged)
    for block in blocks:
        index = ref.block_slices(block)
        assert torch.linalg.vector_norm(step[index]).item() == pytest.approx(
            lr * torch.linalg.vector_norm(grads[0].reshape(merged)[index]).item(), rel=1e-10
        )


def test_adagrad_grafting_before_start_is_adagrad():
    p0 = _randn(4, 3, seed=40)
    g = _randn(4, 3, seed=41)
    p = p0.clone()
    opt = ReferenceShampoo([p], lr=0.1, betas=(0.0, 1.0), start_preconditioning_step=5, grafting_epsilon=1e-10)
    opt.step([g])
    torch.testing.assert_close(p, p0 - 0.1 * g / (g.abs() + 1e-10), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- weight decay


def test_l2_vs_decoupled_weight_decay_first_step_before_preconditioning():
    p0 = _randn(4, 3, seed=50)
    g = _randn(4, 3, seed=51)
    lr, wd, geps = 0.1, 0.3, 1e-10
    common = dict(lr=lr, betas=(0.0, 1.0), weight_decay=wd, start_preconditioning_step=5, grafting_epsilon=geps)
    p_l2, p_dec = p0.clone(), p0.clone()
    ReferenceShampoo([p_l2], use_decoupled_weight_decay=False, **common).step([g])
    ReferenceShampoo([p_dec], use_decoupled_weight_decay=True, **common).step([g])
    g_l2 = g + wd * p0
    torch.testing.assert_close(p_l2, p0 - lr * g_l2 / (g_l2.abs() + geps), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p_dec, p0 - lr * (g / (g.abs() + geps) + wd * p0), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(p_l2, p_dec)


def test_l2_vs_decoupled_weight_decay_first_step_preconditioned():
    p0 = _randn(4, 3, seed=52)
    g = _randn(4, 3, seed=53)
    lr, wd = 0.1, 0.3
    common = dict(lr=lr, betas=(0.0, 1.0), grafting="adagrad")
    p_none, p_l2, p_dec, p_gl2 = p0.clone(), p0.clone(), p0.clone(), p0.clone()
    ReferenceShampoo([p_none], **common).step([g])
    ReferenceShampoo([p_l2], weight_decay=wd, use_decoupled_weight_decay=False, **common).step([g])
    ReferenceShampoo([p_dec], weight_decay=wd, use_decoupled_weight_decay=True, **common).step([g])
    ReferenceShampoo([p_gl2], **common).step([g + wd * p0])
    # decoupled: the preconditioned step of g, plus lr * wd * p
    torch.testing.assert_close(p_dec, p_none - lr * wd * p0, rtol=1e-12, atol=1e-12)
    # L2: the preconditioned step of g + wd * p
    torch.testing.assert_close(p_l2, p_gl2, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(p_l2, p_dec)


# ----------------------------------------------------------------------- momentum


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("grafting", ["none", "sgd"])
def test_momentum_on_0d_block_is_sgd(nesterov, grafting):
    lr, mom, wd = 0.1, 0.9, 0.01
    p_ref = _randn(1, 1, seed=60)
    p_sgd = p_ref.clone().requires_grad_(True)
    opt = ReferenceShampoo(
        [p_ref],
        lr=lr,
        betas=(0.0, 1.0),
        momentum=mom,
        nesterov=nesterov,
        weight_decay=wd,
        use_decoupled_weight_decay=False,
        grafting=grafting,
    )
    sgd = torch.optim.SGD([p_sgd], lr=lr, momentum=mom, nesterov=nesterov, weight_decay=wd)
    for s in range(5):
        g = _randn(1, 1, seed=61 + s)
        opt.step([g])
        p_sgd.grad = g.clone()
        sgd.step()
        torch.testing.assert_close(p_ref, p_sgd.detach(), rtol=1e-12, atol=1e-12)
    assert opt.state[0]["merged_shape"] == ()


def test_momentum_dampening_first_step():
    # B starts at zero: the first B is (1 - dampening) X
    p0 = torch.tensor([2.0], dtype=F64)
    p = p0.clone()
    opt = ReferenceShampoo([p], lr=1.0, betas=(0.0, 1.0), momentum=0.5, dampening=0.25, grafting="none")
    opt.step([torch.tensor([4.0], dtype=F64)])
    torch.testing.assert_close(p, p0 - 0.75 * 4.0)


# ---------------------------------------------------------------------- bookkeeping


def test_none_grad_skips_and_keeps_step_count():
    a, b = _randn(3, 2, seed=70), _randn(2, seed=71)
    b0 = b.clone()
    opt = ReferenceShampoo([a, b], lr=0.1)
    opt.step([_randn(3, 2, seed=72), None])
    assert opt.state[0]["t"] == 1 and opt.state[1]["t"] == 0
    torch.testing.assert_close(b, b0, rtol=0, atol=0)


def test_clipping_scales_all_gradients_together():
    a, b = _randn(3, 2, seed=80), _randn(2, seed=81)
    ga, gb = _randn(3, 2, seed=82), _randn(2, seed=83)
    N = torch.sqrt((ga**2).sum() + (gb**2).sum()).item()
    common = dict(lr=0.1, betas=(0.0, 1.0), grafting="sgd", start_preconditioning_step=10)
    a1, b1 = a.clone(), b.clone()
    ReferenceShampoo([a1, b1], max_grad_norm=N / 2, **common).step([ga, gb])
    torch.testing.assert_close(a1, a - 0.1 * ga / 2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b1, b - 0.1 * gb / 2, rtol=1e-12, atol=1e-12)
    a2 = a.clone()
    ReferenceShampoo([a2], max_grad_norm=1e9, **common).step([ga])  # below the max: untouched
    torch.testing.assert_close(a2, a - 0.1 * ga, rtol=1e-12, atol=1e-12)


def test_roots_follow_frequency_and_bias_correction():
    p = _randn(3, 2, seed=90)
    beta2 = 0.5
    opt = ReferenceShampoo(
        [p], lr=0.01, betas=(0.0, beta2), precondition_frequency=2, epsilon=1e-3, max_preconditioner_dim=3
    )
    grads = [_randn(3, 2, seed=91 + s) for s in range(3)]
    bs = opt.state[0]["blocks"][0]
    opt.step([grads[0]])  # t = 1 < start = 2: roots untouched
    torch.testing.assert_close(bs["R"][0], torch.eye(3, dtype=F64), rtol=0, atol=0)
    opt.step([grads[1]])  # t = 2: roots recomputed from F / (1 - beta2^2)
    F0 = beta2 * ((1 - beta2) * grads[0] @ grads[0].T) + (1 - beta2) * grads[1] @ grads[1].T
    torch.testing.assert_close(bs["F"][0], F0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bs["R"][0], ref.inverse_root(F0 / (1 - beta2**2), 4, 1e-3), rtol=1e-12, atol=1e-12)
    R_at_2 = bs["R"][0].clone()
    opt.step([grads[2]])  # t = 3: (3 - 2) % 2 != 0, roots kept
    torch.testing.assert_close(bs["R"][0], R_at_2, rtol=0, atol=0)
