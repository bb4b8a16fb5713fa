"""Autograd glue for training with the optimizer fused into the backward.

``fused_lookup`` runs the pooled forward; its backward does not return a
gradient for the tables: it hands ``grad_output`` to a fused optimizer, which
updates the touched rows and their state in place. The gradient for
per-sample weights (if they require it) is computed first, from the rows as
they were in the forward.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from dist_rec.ops.embedding_bag import _ops

# Called with grad_output [B, sum of dims]; updates the tables in place.
ApplyGrad = Callable[[torch.Tensor], None]


def _forward_below_autograd(weights, layout, indices, offsets, per_sample_weights) -> torch.Tensor:
    """The pooled forward op, called past its autograd layer: the op's Python
    autograd wrapper (``register_autograd``) costs tens of microseconds a call,
    a fifth of a small GPU forward, and nothing here needs it."""
    with torch._C._AutoDispatchBelowAutograd():
        return _ops.embedding_bag_forward.default(weights, *layout, indices, offsets, per_sample_weights)


class _FusedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, per_sample_weights, weights, layout, indices, offsets, apply_grad):
        ctx.weights = weights
        ctx.layout = layout
        ctx.apply_grad = apply_grad
        ctx.save_for_backward(indices, offsets)
        return _forward_below_autograd(weights, layout, indices, offsets, per_sample_weights)

    @staticmethod
    def backward(ctx, grad_output):
        indices, offsets = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        psw_grad = None
        if ctx.needs_input_grad[1]:
            psw_grad = _ops.embedding_bag_per_sample_weights_grad(ctx.weights, *ctx.layout, indices, offsets, grad_output)
        ctx.apply_grad(grad_output)
        return None, psw_grad, None, None, None, None, None


def fused_lookup(
    anchor: torch.Tensor,
    weights: Sequence[torch.Tensor],
    layout,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    apply_grad: ApplyGrad,
) -> torch.Tensor:
    """Pooled lookup whose backward calls ``apply_grad(grad_output)``.

    ``anchor`` is an empty tensor that requires grad: it puts the lookup in
    the autograd graph even though the tables themselves do not require grad
    (so dense optimizers and DDP leave them alone).
    """
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # Nothing to record for a backward (inference, evaluation).
        return _forward_below_autograd(list(weights), layout, indices, offsets, per_sample_weights)
    return _FusedLookup.apply(anchor, per_sample_weights, list(weights), layout, indices, offsets, apply_grad)
