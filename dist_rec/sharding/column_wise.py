"""Column-wise sharding: the table's columns split into blocks, each block
(all rows) on one rank.

Every block receives all of the feature's ids and pools its columns; the
owner of the sample places the blocks side by side. Wide tables spread
their lookup bandwidth this way without splitting the id space.

Row-wise optimizer state is kept per row, not per block: the blocks of a
row must agree on ``mean(g^2)`` over the *whole* row. ``ColumnBlockUpdate``
lets the blocks of a table add their partial sums of squares before the
update, so a column-sharded table trains exactly like the unsharded one
(TorchRec keeps a separate state per block instead).
"""

from typing import Dict

import torch
import torch.distributed as dist

from dist_rec.ops.embedding_bag import WeightDecayMode, embedding_bag_backward_row_grad
from dist_rec.ops.reference import _adagrad_row_step
from dist_rec.optim.fused import MomentumScaledRowWiseAdagrad
from dist_rec.sharding.comm import COMM_STATS
from dist_rec.sharding.scheme import WholeRowsScheme


class ColumnWise(WholeRowsScheme):
    sharding_type = "column_wise"


class ColumnBlockUpdate:
    """The fused update of a rank's column blocks under a row-wise optimizer.

    Each block sums its rows' gradients over the batch, and the blocks of a
    table add their per-row sums of squares (one all-reduce over the table's
    block ranks, which all saw the same ids, so the rows line up). Each block
    then steps with the accumulator of the whole row: what the unsharded
    table would do. Installed as the local collection's ``_apply_fused_update``.
    """

    def __init__(self, collection, groups: Dict[str, "dist.ProcessGroup"], full_dims: Dict[str, int]) -> None:
        self.collection = collection
        self.groups = groups
        self.full_dims = full_dims

    @torch.no_grad()
    def __call__(self, layout, values, offsets, per_sample_weights, grad_output) -> None:
        collection = self.collection
        optimizer = collection.optimizer
        weights = collection._weights()
        row_ids, row_grads = embedding_bag_backward_row_grad(weights, *layout, values, offsets, per_sample_weights, grad_output)
        decay, mode = optimizer._decay()
        mode = WeightDecayMode(mode)
        names = list(collection.embedding_bags.keys())
        for name, weight, state, ids, grad in zip(names, weights, collection._optimizer_states, row_ids, row_grads):
            table = name.rsplit("@", 1)[0]
            rows = weight[ids].to(torch.float32)
            decayed = grad + decay * rows if mode == WeightDecayMode.L2 else grad
            sum_of_squares = decayed.pow(2).sum(dim=1)
            group = self.groups[table]
            dist.all_reduce(sum_of_squares, group=group)
            size = dist.get_world_size(group)
            COMM_STATS.record("column_state", 2 * (size - 1) * sum_of_squares.numel() * 4 // size)
            mean_square = sum_of_squares / self.full_dims[table]
            if isinstance(optimizer, MomentumScaledRowWiseAdagrad):
                increment = state["momentum1_increment"][ids] + mean_square
                state["momentum1_increment"][ids] = increment
                accumulator = state["momentum1"][ids] + optimizer.momentum_scale * increment
            else:
                accumulator = state["momentum1"][ids] + mean_square
                state["momentum1"][ids] = accumulator
            step = _adagrad_row_step(rows, grad, accumulator, optimizer.lr, optimizer.eps, decay, mode)
            weight[ids] = step.to(weight.dtype)
