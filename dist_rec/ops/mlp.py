"""An MLP's forward and backward as one autograd node, with its ReLUs in place.

``fused_mlp(x, weights, biases, relu)`` is ``Linear -> [ReLU] -> Linear ->
[ReLU] ...``, the layers DLRM's dense and over arches stack. Run as modules,
autograd gives every ReLU a fresh output in the forward and a fresh masked
gradient in the backward, then sums that gradient once more for the bias:
on DLRM's kaggle MLPs (B=2048, widths up to 512) four passes over
megabyte-sized activations per layer beside its GEMMs, two of them into
freshly allocated buffers. Here the ReLU rectifies the GEMM's output where
it lies and the backward masks the gradient it owns where it lies (the
passes remain; the cold buffers and their allocations go). The GEMMs are
the calls ``nn.Linear`` makes, so for contiguous inputs the results equal
the modules' to the last bit (the tests compare them, and to
``mlp_reference``).

The saved tensors are each layer's input, and the last layer's output where
a ReLU follows it, as ``nn.Linear`` and ``nn.ReLU`` save them: an in-place
change to the output before the backward is an error after a ReLU, as for
``nn.ReLU``, and allowed after a plain last layer (logits). A gradient
taken with ``create_graph=True`` (to be differentiated again) is computed
through ``mlp_reference`` instead, out of place.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def mlp_reference(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], relu: Sequence[bool]
) -> torch.Tensor:
    """Plain PyTorch: ``F.linear`` then, where ``relu[k]``, ``F.relu``, per layer."""
    for weight, bias, rectify in zip(weights, biases, relu):
        x = F.linear(x, weight, bias)
        if rectify:
            x = F.relu(x)
    return x


def _forward_layers(x, weights, biases, relu) -> List[torch.Tensor]:
    """Every layer's input, then the last layer's output."""
    activations = [x]
    for weight, bias, rectify in zip(weights, biases, relu):
        x = torch.addmm(bias, x, weight.t())
        if rectify:
            x.clamp_min_(0)
        activations.append(x)
    return activations


class _FusedMLP(torch.autograd.Function):
    """Saves each layer's input, and the last layer's output only when a ReLU
    follows it (its mask). The first mask of the backward is taken out of
    place: that gradient is autograd's, which other nodes may read; every
    later one is a product this backward made, so it is masked in place."""

    @staticmethod
    def forward(ctx, x, relu, *parameters):
        layers = len(relu)
        weights, biases = parameters[:layers], parameters[layers:]
        activations = _forward_layers(x, weights, biases, relu)
        ctx.relu = relu
        saved_activations = activations if relu[-1] else activations[:-1]
        ctx.save_for_backward(*saved_activations, *parameters)
        return activations[-1]

    @staticmethod
    def backward(ctx, grad_output):
        relu = ctx.relu
        layers = len(relu)
        saved = list(ctx.saved_tensors)
        activations = saved[: layers + 1] if relu[-1] else saved[:layers] + [None]
        weights = saved[len(saved) - 2 * layers : len(saved) - layers]
        biases = saved[len(saved) - layers :]
        if torch.is_grad_enabled():  # create_graph: this gradient will be differentiated in turn
            return _differentiable_backward(ctx, grad_output, activations[0], weights, biases)
        # below[k]: some gradient is wanted from layers under k (or x), so the
        # product that carries the gradient down through layer k is needed.
        below, wanted = [False] * layers, ctx.needs_input_grad[0]
        for k in range(layers):
            below[k] = wanted
            wanted = wanted or ctx.needs_input_grad[2 + k] or ctx.needs_input_grad[2 + layers + k]
        grad_weights: List[Optional[torch.Tensor]] = [None] * layers
        grad_biases: List[Optional[torch.Tensor]] = [None] * layers
        grad, owned = grad_output, False
        for k in reversed(range(layers)):
            if relu[k]:
                if owned:
                    torch.ops.aten.threshold_backward.grad_input(grad, activations[k + 1], 0, grad_input=grad)
                else:
                    grad, owned = torch.ops.aten.threshold_backward(grad, activations[k + 1], 0), True
            if ctx.needs_input_grad[2 + k]:
                grad_weights[k] = grad.t().mm(activations[k])
            if ctx.needs_input_grad[2 + layers + k]:
                grad_biases[k] = grad.sum(0)
            if not below[k]:
                break
            grad, owned = grad.mm(weights[k]), True
        return (grad if ctx.needs_input_grad[0] else None, None, *grad_weights, *grad_biases)


def _differentiable_backward(ctx, grad_output, x, weights, biases):
    """The gradients as a graph of their own (for a gradient of a gradient,
    such as a gradient penalty): the forward again through the reference,
    whose activations, unlike the saved ones, hang on the weights."""
    inputs = [x, *weights, *biases]
    slots = [0] + list(range(2, len(inputs) + 1))  # forward's arguments: x, relu, *parameters
    wanted = [i for i, slot in enumerate(slots) if ctx.needs_input_grad[slot]]
    out = mlp_reference(x, weights, biases, ctx.relu)
    grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_output, create_graph=True, allow_unused=True)
    result: List[Optional[torch.Tensor]] = [None] * (len(inputs) + 1)
    for i, grad in zip(wanted, grads):
        result[slots[i]] = grad if grad is not None else torch.zeros_like(inputs[i])
    return tuple(result)


def fused_mlp(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], relu: Sequence[bool]
) -> torch.Tensor:
    """``x`` through the layers ``x @ weights[k].T + biases[k]``, each followed
    by a ReLU where ``relu[k]``: ``mlp_reference``'s result, each ReLU and
    its gradient computed in place (see the module docstring).

    Args:
        x (Tensor): ``[B, in]``.
        weights (Sequence[Tensor]): ``[out_k, in_k]`` per layer, ``in_0 = in``, ``in_k = out_{k-1}``.
        biases (Sequence[Tensor]): ``[out_k]`` per layer.
        relu (Sequence[bool]): whether layer ``k`` is followed by a ReLU.
    """
    weights, biases, relu = list(weights), list(biases), tuple(bool(r) for r in relu)
    _check_layers(x, weights, biases, relu)
    if not weights:
        return x
    if torch.is_autocast_enabled(x.device.type):  # the modules' casts (and saved cast weights) are the reference's
        return mlp_reference(x, weights, biases, relu)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *biases)):
        return _FusedMLP.apply(x, relu, *weights, *biases)
    return _forward_layers(x, weights, biases, relu)[-1]


def _check_layers(
    x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor], relu: Tuple[bool, ...]
) -> None:
    if not len(weights) == len(biases) == len(relu):
        raise ValueError(
            f"fused_mlp: {len(weights)} weights, {len(biases)} biases and {len(relu)} relu flags; "
            "need one of each per layer."
        )
    if x.dim() != 2:
        raise ValueError(f"fused_mlp: x must be [B, in]; it has shape {tuple(x.shape)}.")
    width = x.shape[1]
    for k, (weight, bias) in enumerate(zip(weights, biases)):
        if weight.dim() != 2 or weight.shape[1] != width or bias.shape != (weight.shape[0],):
            raise ValueError(
                f"fused_mlp: layer {k} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}; "
                f"its input is {width} wide, so it needs weight [out, {width}] and bias [out]."
            )
        width = weight.shape[0]
