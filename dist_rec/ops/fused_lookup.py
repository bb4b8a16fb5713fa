"""Autograd glue for training with the optimizer fused into the backward.

``fused_lookup`` runs a storage's pooled forward; its backward does not
return a gradient for the tables: it hands ``grad_output`` to an update
rule, which steps the touched rows and their state in place. The gradient
for per-sample weights (if they require it) is computed first, from the
rows as they were in the forward.

The storage is anything with ``forward(layout, indices, offsets,
per_sample_weights)`` and ``per_sample_weights_grad(layout, indices,
offsets, grad_output)``: ``dist_rec.placement.EmbeddingStorage``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# Called with grad_output [B, sum of dims]; updates the tables in place.
ApplyGrad = Callable[[torch.Tensor], None]


class _FusedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, per_sample_weights, storage, layout, indices, offsets, apply_grad):
        ctx.storage = storage
        ctx.layout = layout
        ctx.apply_grad = apply_grad
        ctx.save_for_backward(indices, offsets)
        return storage.forward(layout, indices, offsets, per_sample_weights)

    @staticmethod
    def backward(ctx, grad_output):
        indices, offsets = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        psw_grad = None
        if ctx.needs_input_grad[1]:
            psw_grad = ctx.storage.per_sample_weights_grad(ctx.layout, indices, offsets, grad_output)
        ctx.apply_grad(grad_output)
        return None, psw_grad, None, None, None, None, None


def fused_lookup(
    anchor: torch.Tensor,
    storage,
    layout,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    apply_grad: ApplyGrad,
) -> torch.Tensor:
    """Pooled lookup of ``storage`` whose backward calls ``apply_grad(grad_output)``.

    ``anchor`` is an empty tensor that requires grad: it puts the lookup in
    the autograd graph even though the tables themselves do not require grad
    (so dense optimizers and DDP leave them alone).
    """
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # Nothing to record for a backward (inference, evaluation).
        return storage.forward(layout, indices, offsets, per_sample_weights)
    return _FusedLookup.apply(anchor, per_sample_weights, storage, layout, indices, offsets, apply_grad)
