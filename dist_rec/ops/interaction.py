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

``dot_interaction_blocks(dense, values, block_widths, feature_block,
feature_column)`` is the same product with the pooled embeddings read where
a sharded lookup receives them: ``values`` is a flat buffer of row-major
blocks ``[B, W_r]`` (one per source rank, one after another), feature ``f``
at columns ``[feature_column[f], + D)`` of block ``feature_block[f]``. Its
gradient comes back in that layout, the buffer the output all-to-all's
backward sends, so neither the forward's concatenation into feature order
nor the backward's split exists.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

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


def _blocks_in_feature_order(
    values: torch.Tensor, batch: int, dim: int, block_widths: Sequence[int], feature_block: Sequence[int],
    feature_column: Sequence[int],
) -> torch.Tensor:
    """``[B, F * D]``: the features of a blocks buffer, gathered in order."""
    blocks = [b.view(batch, w) for b, w in zip(torch.split(values, [batch * w for w in block_widths]), block_widths)]
    if not feature_block:
        return values.new_zeros(batch, 0)
    return torch.cat([blocks[r][:, c : c + dim] for r, c in zip(feature_block, feature_column)], dim=1)


def dot_interaction_blocks_reference(
    dense: torch.Tensor, values: torch.Tensor, block_widths: Sequence[int], feature_block: Sequence[int],
    feature_column: Sequence[int],
) -> torch.Tensor:
    """Plain PyTorch: the features cut out of their blocks, concatenated in
    feature order, then ``dot_interaction_reference``."""
    batch, dim = dense.shape
    sparse = _blocks_in_feature_order(values, batch, dim, block_widths, feature_block, feature_column)
    return dot_interaction_reference(dense, sparse)


def dot_interaction_blocks(
    dense: torch.Tensor, values: torch.Tensor, block_widths: Sequence[int], feature_block: Sequence[int],
    feature_column: Sequence[int],
) -> torch.Tensor:
    """``dot_interaction`` of the features laid out in blocks (see the module
    docstring): ``[B, D + (F + 1) F / 2]``.

    Args:
        dense (Tensor): ``[B, D]``.
        values (Tensor): 1-D, the blocks ``[B, block_widths[r]]`` one after another.
        block_widths (Sequence[int]): columns of each block.
        feature_block (Sequence[int]): the block of each feature, in feature order.
        feature_column (Sequence[int]): its first column in that block.
    """
    block_widths, feature_block, feature_column = list(block_widths), list(feature_block), list(feature_column)
    if dense.dim() != 2:
        raise ValueError(f"dot_interaction_blocks: dense must be [B, D]; it has shape {tuple(dense.shape)}.")
    if not _native_applies(dense, values):
        return dot_interaction_blocks_reference(dense, values, block_widths, feature_block, feature_column)
    if dense.stride(1) != 1:
        dense = dense.contiguous()
    return torch.ops.dist_rec.dot_interaction_blocks(dense, values.contiguous(), block_widths, feature_block, feature_column)


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


@torch.library.register_fake("dist_rec::dot_interaction_blocks")
def _dot_interaction_blocks_fake(dense, values, block_widths, feature_block, feature_column):
    vectors = len(feature_block) + 1
    return dense.new_empty((dense.shape[0], dense.shape[1] + vectors * (vectors - 1) // 2))


@torch.library.register_fake("dist_rec::dot_interaction_blocks_backward")
def _dot_interaction_blocks_backward_fake(grad_output, dense, values, block_widths, feature_block, feature_column):
    return dense.new_empty(dense.shape), values.new_empty(values.shape)


def _blocks_setup_context(ctx, inputs, output):
    dense, values, *layout = inputs
    ctx.layout = layout
    ctx.save_for_backward(dense, values)


def _blocks_backward(ctx, grad_output):
    dense, values = ctx.saved_tensors
    grad_dense, grad_values = torch.ops.dist_rec.dot_interaction_blocks_backward(grad_output, dense, values, *ctx.layout)
    return grad_dense, grad_values, None, None, None


torch.library.register_autograd(
    "dist_rec::dot_interaction_blocks", _blocks_backward, setup_context=_blocks_setup_context
)
