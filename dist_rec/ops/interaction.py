"""DLRM's dot interaction: the native fused op and its plain-PyTorch reference.

``dot_interaction(dense, sparse)`` returns ``[B, D + P]``: the dense vector,
then the dot product of every pair ``i < j`` of the ``F + 1`` vectors
(dense first, then the F pooled embeddings), row-major over the upper
triangle, as TorchRec's ``InteractionArch`` orders them.

On the CPU (float32, float64) it runs ``torch.ops.dist_rec.dot_interaction``
(``csrc/interaction``): one pass per sample, where the reference builds the
``[B, F + 1, F + 1]`` Gram tensor with a batched product, gathers its
triangle and, in the backward, scatters into a zero-filled tensor of that
size. Elsewhere (CUDA, half precision) the reference runs.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

import dist_rec._C  # noqa: F401  registers torch.ops.dist_rec

_NATIVE_DTYPES = (torch.float32, torch.float64)
_PAIR_INDEX: Dict[Tuple[int, torch.device], torch.Tensor] = {}


def _pair_index(vectors: int, device: torch.device) -> torch.Tensor:
    """Flat positions of the upper triangle (offset 1) of a ``vectors`` square."""
    key = (vectors, device)
    index = _PAIR_INDEX.get(key)
    if index is None:
        rows, cols = torch.triu_indices(vectors, vectors, offset=1, device=device)
        index = _PAIR_INDEX[key] = rows * vectors + cols
    return index


def dot_interaction_reference(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: ``dense`` [B, D], ``sparse`` [B, F * D] (or [B, F, D])."""
    batch, dim = dense.shape
    features = sparse.shape[1] // dim if sparse.dim() == 2 else sparse.shape[1]
    vectors = torch.cat([dense.unsqueeze(1), sparse.reshape(batch, features, dim)], dim=1)  # [B, F + 1, D]
    dots = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)  # [B, (F + 1)^2]
    # index_select, not dots[:, index]: its backward is an index_add where
    # advanced indexing's is an accumulating index_put.
    return torch.cat([dense, dots.index_select(1, _pair_index(vectors.shape[1], dense.device))], dim=1)


def _native_applies(dense: torch.Tensor, sparse: torch.Tensor) -> bool:
    return (
        dense.device.type == "cpu"
        and sparse.device == dense.device
        and dense.dtype in _NATIVE_DTYPES
        and sparse.dtype == dense.dtype
        and dense.dim() == 2
    )


def dot_interaction(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """``[dense, <v_i, v_j> for i < j]`` per sample, ``[B, D + (F + 1) F / 2]``.

    Args:
        dense (Tensor): ``[B, D]``, the dense arch's output.
        sparse (Tensor): ``[B, F * D]`` or ``[B, F, D]``, the pooled
            embeddings (a ``KeyedTensor``'s values as they are).
    """
    if dense.dim() != 2:
        raise ValueError(f"dot_interaction: dense must be [B, D]; it has shape {tuple(dense.shape)}.")
    if sparse.dim() == 3:
        if sparse.shape[2] != dense.shape[1]:
            raise ValueError(
                f"dot_interaction: sparse [B, F, D] has D={sparse.shape[2]} but dense has D={dense.shape[1]}."
            )
        sparse = sparse.flatten(1)
    if not _native_applies(dense, sparse):
        return dot_interaction_reference(dense, sparse)
    if dense.stride(1) != 1:
        dense = dense.contiguous()
    if sparse.stride(1) != 1:
        sparse = sparse.contiguous()
    return torch.ops.dist_rec.dot_interaction(dense, sparse)


@torch.library.register_fake("dist_rec::dot_interaction")
def _dot_interaction_fake(dense, sparse):
    vectors = sparse.shape[1] // dense.shape[1] + 1
    return dense.new_empty((dense.shape[0], dense.shape[1] + vectors * (vectors - 1) // 2))


@torch.library.register_fake("dist_rec::dot_interaction_backward")
def _dot_interaction_backward_fake(grad_output, dense, sparse):
    return dense.new_empty(dense.shape), sparse.new_empty(sparse.shape)


def _setup_context(ctx, inputs, output):
    dense, sparse = inputs
    ctx.save_for_backward(dense, sparse)


def _backward(ctx, grad_output):
    dense, sparse = ctx.saved_tensors
    grad_dense, grad_sparse = torch.ops.dist_rec.dot_interaction_backward(grad_output, dense, sparse)
    return grad_dense, grad_sparse


torch.library.register_autograd("dist_rec::dot_interaction", _backward, setup_context=_setup_context)
