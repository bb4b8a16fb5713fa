"""The fused MLP against its plain-PyTorch reference and against the
``nn.Sequential`` it replaces in DLRM: forward and every gradient, on random
widths, batches (empty, one) and ReLU patterns, in float32 and float64; the
gradients it is handed left untouched; bad layers refused clearly; and the
models' arches falling back to their modules wherever fusing would change
what runs."""

import pytest
import torch
from torch import nn

from dist_rec.models.dlrm import DenseArch, OverArch
from dist_rec.ops.mlp import fused_mlp, mlp_reference

CASES = [  # (batch, widths, relu per layer)
    (64, [13, 32, 16, 8], [True, True, True]),  # DLRM's dense arch: a ReLU after every layer
    (64, [40, 32, 16, 1], [True, True, False]),  # its over arch: logits last
    (1, [5, 7], [True]),
    (0, [6, 4, 3], [True, False]),  # empty batch
    (33, [9, 17, 3], [False, False]),  # no ReLU at all
    (17, [3, 300, 129, 2], [True, False, True]),  # ReLU patterns in between
]


def _layers(seed, widths, dtype):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o, i, generator=g, dtype=dtype, requires_grad=True) for i, o in zip(widths, widths[1:])]
    biases = [torch.randn(o, generator=g, dtype=dtype, requires_grad=True) for o in widths[1:]]
    return weights, biases


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad, allow_unused=True)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, widths, relu", CASES)
def test_matches_the_reference_forward_and_backward(seed, dtype, batch, widths, relu):
    weights, biases = _layers(seed, widths, dtype)
    x = torch.randn(batch, widths[0], dtype=dtype, generator=torch.Generator().manual_seed(seed + 7))
    x.requires_grad_()
    out = fused_mlp(x, weights, biases, relu)
    expected = mlp_reference(x, weights, biases, relu)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, **tol)
    grad = torch.randn(expected.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed + 100))
    inputs = [x, *weights, *biases]
    for got, want in zip(_grads(out, inputs, grad), _grads(expected, inputs, grad)):
        torch.testing.assert_close(got, want, **tol)


def test_ties_at_zero_take_relus_gradient():
    """Pre-activations exactly 0 (a zero input row): ReLU's gradient there is 0, as threshold_backward's."""
    weights, biases = _layers(3, [4, 6, 5], torch.float64)
    with torch.no_grad():
        biases[0].zero_()
    x = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    out, expected = fused_mlp(x, weights, biases, [True, True]), mlp_reference(x, weights, biases, [True, True])
    grad = torch.ones_like(expected)
    for got, want in zip(_grads(out, [x, *weights, *biases], grad), _grads(expected, [x, *weights, *biases], grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gradcheck():
    weights, biases = _layers(5, [3, 6, 4, 2], torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    relu = [True, False, True]
    assert torch.autograd.gradcheck(lambda x, *p: fused_mlp(x, p[:3], p[3:], relu), (x, *weights, *biases))


def test_leaves_the_gradient_it_is_handed_untouched():
    weights, biases = _layers(2, [8, 16, 16], torch.float32)
    x = torch.randn(10, 8)
    out = fused_mlp(x, weights, biases, [True, True])
    grad = torch.randn(out.shape)
    kept = grad.clone()
    out.backward(grad)
    assert torch.equal(grad, kept)


def test_frozen_layers_and_input_get_no_gradient():
    weights, biases = _layers(4, [6, 5, 4], torch.float32)
    weights[0].requires_grad_(False)
    biases[1].requires_grad_(False)
    x = torch.randn(7, 6)  # no gradient asked for
    fused_mlp(x, weights, biases, [True, False]).sum().backward()
    assert weights[0].grad is None and biases[1].grad is None
    fused_grads = [weights[1].grad, biases[0].grad]
    weights[1].grad = biases[0].grad = None
    mlp_reference(x, weights, biases, [True, False]).sum().backward()
    for got, want in zip(fused_grads, [weights[1].grad, biases[0].grad]):
        torch.testing.assert_close(got, want)


def test_under_autocast_the_references_casts():
    weights, biases = _layers(7, [6, 9, 3], torch.float32)
    x = torch.randn(11, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_mlp(x, weights, biases, [True, False])
        expected = mlp_reference(x, weights, biases, [True, False])
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert all(p.grad is not None for p in (*weights, *biases))


def test_without_autograd_the_same_values():
    weights, biases = _layers(6, [6, 9, 3], torch.float32)
    x = torch.randn(11, 6)
    with torch.no_grad():
        out = fused_mlp(x, weights, biases, [True, True])
    assert not out.requires_grad
    torch.testing.assert_close(out, mlp_reference(x, weights, biases, [True, True]), rtol=1e-6, atol=1e-6)


def test_changing_the_output_in_place_before_backward_is_an_error_after_a_relu():
    """As for ``nn.ReLU``, whose saved output it is."""
    weights, biases = _layers(1, [4, 3], torch.float32)
    out = fused_mlp(torch.randn(2, 4), weights, biases, [True])
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_changing_a_linear_output_in_place_before_backward_is_allowed():
    """As for ``nn.Linear``, which saves no output (an over arch's logits, say, then ``sigmoid_``)."""
    weights, biases = _layers(1, [4, 3, 2], torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    fused_mlp(x, weights, biases, [True, False]).sigmoid_().sum().backward()
    fused = [p.grad.clone() for p in (*weights, *biases)]
    for p in (*weights, *biases):
        p.grad = None
    mlp_reference(x, weights, biases, [True, False]).sigmoid_().sum().backward()
    for got, p in zip(fused, (*weights, *biases)):
        torch.testing.assert_close(got, p.grad, rtol=1e-12, atol=1e-12)


def test_frozen_lower_layers_cost_no_gradient_products():
    """Autograd prunes the input-gradient products below the last layer that
    learns; so does the fused backward (counted with a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                CountMatmuls.calls += 1
            return func(*args, **(kwargs or {}))

    weights, biases = _layers(2, [5, 6, 7, 3], torch.float32)
    for p in (weights[0], biases[0], weights[1], biases[1]):
        p.requires_grad_(False)
    out = fused_mlp(torch.randn(4, 5), weights, biases, [True, True, False])
    with CountMatmuls():
        out.sum().backward()
    assert CountMatmuls.calls == 1  # the top layer's weight gradient only


@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_gradient_of_a_gradient_matches_the_reference(x_requires_grad):
    """A gradient penalty: the gradient taken with create_graph=True, then differentiated."""
    weights, biases = _layers(1, [4, 6, 3], torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=x_requires_grad)
    relu = [True, True]

    def penalty_grads(mlp):
        out = mlp(x, weights, biases, relu)
        inputs = [x, *weights] if x_requires_grad else list(weights)
        first = torch.autograd.grad((out**2).sum(), inputs, create_graph=True)
        return torch.autograd.grad(sum((g**2).sum() for g in first), [*weights, *biases], allow_unused=True)

    for got, want in zip(penalty_grads(fused_mlp), penalty_grads(mlp_reference)):
        torch.testing.assert_close(got if got is not None else torch.zeros_like(want), want, rtol=1e-12, atol=1e-12)
    x.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, *p: fused_mlp(x, p[:2], p[2:], relu), (x, *weights, *biases))


@pytest.mark.parametrize(
    "x_shape, weight_shapes, bias_shapes, relu, match",
    [
        ((2, 4), [(3, 4)], [(3,)], [True, False], "1 weights, 1 biases and 2 relu flags"),
        ((2, 4), [(3, 5)], [(3,)], [True], "layer 0 has weight \\(3, 5\\).*needs weight \\[out, 4\\]"),
        ((2, 4), [(3, 4), (2, 4)], [(3,), (2,)], [True, True], "layer 1 has weight \\(2, 4\\).*input is 3 wide"),
        ((2, 4), [(3, 4)], [(4,)], [True], "layer 0 .* bias \\(4,\\)"),
        ((2, 3, 4), [(3, 4)], [(3,)], [True], "x must be \\[B, in\\]"),
    ],
)
def test_bad_layers_are_refused(x_shape, weight_shapes, bias_shapes, relu, match):
    with pytest.raises(ValueError, match=match):
        weights, biases = [torch.randn(s) for s in weight_shapes], [torch.randn(s) for s in bias_shapes]
        fused_mlp(torch.randn(x_shape), weights, biases, relu)


# ---------------------------------------------------------------------------
# DLRM's arches: the fused path where it computes what the modules would
# ---------------------------------------------------------------------------


def _arch_step(arch, x):
    """Output and parameter gradients of one forward and backward."""
    arch.zero_grad(set_to_none=True)
    out = arch(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype))
    return out.detach(), [p.grad.clone() for p in arch.parameters()]


@pytest.mark.parametrize("arch_class, widths", [(DenseArch, [32, 16, 8]), (OverArch, [32, 16, 1])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arches_run_fused_and_match_their_modules(arch_class, widths, dtype):
    torch.manual_seed(0)
    arch = arch_class(12, widths).to(dtype)
    x = torch.randn(40, 12, dtype=dtype)
    assert arch._fusable_layers(x) is not None
    out, grads = _arch_step(arch, x)
    arch.zero_grad(set_to_none=True)
    expected = arch.model(x)
    expected.backward(torch.randn(expected.shape, generator=torch.Generator().manual_seed(9), dtype=dtype))
    # The same GEMM calls and elementwise ops: equal to the last bit.
    assert torch.equal(out, expected.detach())
    for got, p in zip(grads, arch.parameters()):
        assert torch.equal(got, p.grad)


def test_arch_with_a_hook_runs_its_modules():
    """A hook on a layer (a user's, or a ZeRO-3 style parameter gather) must still run."""
    arch = DenseArch(6, [8, 4])
    calls = []
    arch.model[0].register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    x = torch.randn(5, 6)
    assert arch._fusable_layers(x) is None
    arch(x)
    assert calls == [torch.Size([5, 8])]


def test_arch_with_a_global_hook_runs_its_modules():
    arch = DenseArch(6, [8, 4])
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, inputs, output: calls.append(type(module)))
    try:
        assert arch._fusable_layers(torch.randn(5, 6)) is None
        arch(torch.randn(5, 6))
    finally:
        handle.remove()
    assert nn.Linear in calls and nn.ReLU in calls


@pytest.mark.parametrize(
    "change",
    [
        lambda arch: arch.model.append(nn.Dropout(0.5)),  # a module it does not know
        lambda arch: arch.model.insert(1, nn.ReLU()),  # two ReLUs in a row: not one layer's
        lambda arch: setattr(arch.model, "0", nn.Linear(6, 8, bias=False)),  # no bias
        lambda arch: arch.model.insert(0, nn.ReLU()),  # a ReLU before any layer
    ],
)
def test_arch_with_other_modules_runs_them(change):
    arch = DenseArch(6, [8, 4])
    change(arch)
    x = torch.randn(5, 6)
    assert arch._fusable_layers(x) is None
    torch.testing.assert_close(arch.eval()(x), arch.model(x))


def test_arch_on_other_inputs_runs_its_modules():
    arch = DenseArch(6, [8, 4])
    assert arch._fusable_layers(torch.randn(2, 3, 6)) is None  # leading dims beyond the batch
    assert arch._fusable_layers(torch.randn(5, 6, dtype=torch.float64)) is None  # parameters in float32
    assert arch(torch.randn(2, 3, 6)).shape == (2, 3, 4)


def test_arch_with_a_hook_on_its_sequential_runs_it():
    arch = DenseArch(6, [8, 4])
    calls = []
    arch.model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    assert arch._fusable_layers(torch.randn(5, 6)) is None
    arch(torch.randn(5, 6))
    assert calls == [1]


def test_arch_with_a_linear_subclass_or_a_parametrization_runs_its_modules():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    arch = DenseArch(6, [8, 4])
    arch.model[0] = ScaledLinear(6, 8)
    assert arch._fusable_layers(torch.randn(5, 6)) is None
    arch = DenseArch(6, [8, 4])

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    torch.nn.utils.parametrize.register_parametrization(arch.model[2], "weight", Doubled())
    x = torch.randn(5, 6)
    assert arch._fusable_layers(x) is None
    torch.testing.assert_close(arch(x), arch.model(x))


def test_arch_under_autocast_runs_its_modules():
    """bfloat16 GEMMs under autocast: the modules save the cast weights the backward needs."""
    arch = DenseArch(6, [8, 4])
    x = torch.randn(5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert arch._fusable_layers(x) is None
        out = arch(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert arch.model[0].weight.grad is not None


def test_arch_under_functorch_and_forward_ad_runs_its_modules():
    from torch.autograd import forward_ad
    from torch.func import functional_call, grad

    arch = DenseArch(6, [8, 4])
    x = torch.randn(5, 6)
    params = {k: v.detach() for k, v in arch.named_parameters()}
    grads = grad(lambda p: functional_call(arch, p, (x,)).sum())(params)
    expected = torch.autograd.grad(arch.model(x).sum(), list(arch.parameters()))
    for got, want in zip(grads.values(), expected):
        torch.testing.assert_close(got, want)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        assert arch._fusable_layers(dual) is None
        tangent = forward_ad.unpack_dual(arch(dual)).tangent
    assert tangent is not None and tangent.shape == (5, 4)


def test_arch_traced_or_compiled_runs_its_modules():
    arch = DenseArch(6, [8, 4])
    x = torch.randn(5, 6)
    traced = torch.fx.symbolic_trace(arch)
    torch.testing.assert_close(traced(x), arch.model(x))
    jit_traced = torch.jit.trace(arch, x)
    assert "aten::relu" in str(jit_traced.inlined_graph)
    compiled = torch.compile(arch, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), arch.model(x))
