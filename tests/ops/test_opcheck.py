"""torch.library.opcheck on every op: schema (mutation and aliasing as
declared), fake kernels, autograd registration, AOT dispatch."""

import pytest
import torch

import dist_rec.ops  # noqa: F401  (registers fakes and autograd)
from dist_rec.testing.random_problems import random_problem

ops = torch.ops.dist_rec


def _problem(seed, **kw):
    return random_problem(seed, weighted=True, batch=5, **kw)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward(seed, requires_grad):
    p = _problem(seed)
    weights = [w.clone().requires_grad_(requires_grad) for w in p.weights]
    psw = p.per_sample_weights.clone().requires_grad_(requires_grad)
    torch.library.opcheck(ops.embedding_bag_forward.default, (weights, *p.layout, p.indices, p.offsets, psw))


def test_forward_without_per_sample_weights_int32():
    p = random_problem(3, index_dtype=torch.int32)
    torch.library.opcheck(ops.embedding_bag_forward.default, p.op_args())


def _backward_args(p):
    grad = torch.randn(p.batch, p.out_dim)
    return (*p.layout, p.indices, p.offsets, p.per_sample_weights, grad)


def test_backward_sgd():
    p = _problem(4)
    torch.library.opcheck(
        ops.embedding_bag_backward_sgd_.default, (p.clone_weights(), *_backward_args(p), 0.1, 0.01, 1)
    )


def test_backward_rowwise_adagrad():
    p = _problem(5)
    momentum = [torch.rand(w.shape[0]) for w in p.weights]
    torch.library.opcheck(
        ops.embedding_bag_backward_rowwise_adagrad_.default,
        (p.clone_weights(), momentum, *_backward_args(p), 0.1, 1e-8, 0.01, 2),
    )


def test_backward_momentum_scaled_rowwise_adagrad():
    p = _problem(6)
    m_sync = [torch.rand(w.shape[0]) for w in p.weights]
    m_local = [torch.rand(w.shape[0]) for w in p.weights]
    torch.library.opcheck(
        ops.embedding_bag_backward_momentum_scaled_rowwise_adagrad_.default,
        (p.clone_weights(), m_sync, m_local, *_backward_args(p), 0.1, 1e-8, 2.0, 0.0, 0),
    )


def test_backward_row_grad():
    p = _problem(7)
    torch.library.opcheck(ops.embedding_bag_backward_row_grad.default, (p.weights, *_backward_args(p)))


def test_per_sample_weights_grad():
    p = _problem(8)
    grad = torch.randn(p.batch, p.out_dim)
    torch.library.opcheck(
        ops.embedding_bag_per_sample_weights_grad.default, (p.weights, *p.layout, p.indices, p.offsets, grad)
    )
