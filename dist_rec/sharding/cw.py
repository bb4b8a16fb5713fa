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

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist

from dist_rec.planner.plan import ShardingType
from dist_rec.sharding.comm import COMM_STATS
from dist_rec.sharding.lookup import UpdateRule
from dist_rec.sharding.scheme import WholeRowsScheme


class CwSharding(WholeRowsScheme):
    """Input: the feature's bags whole, to every block. Output: the blocks'
    columns side by side. Update: a row-wise optimizer's blocks agree their
    rows' state first (``ColumnBlockUpdate``)."""

    sharding_type = ShardingType.COLUMN_WISE

    def agrees_row_state(self, optimizer) -> bool:
        return bool(optimizer.state_names)


def column_block_group_key(table: str) -> str:
    """The process-group owner's name for the family of groups of the ranks
    holding ``table``'s column blocks, one per sharding group (replica)."""
    return f"column_blocks/{table}"


class ColumnBlockUpdate(UpdateRule):
    """The update of a rank's column blocks under a row-wise optimizer.

    Each block sums its rows' gradients over the batch, and the blocks of a
    table add their per-row sums of squares (one all-reduce over the table's
    block ranks, which all saw the same ids, so the rows line up). Each block
    then steps with the accumulator of the whole row: what the unsharded
    table would do.

    Args:
        process_groups: the owner of the block groups (asked at each update,
            so a rebuild is picked up).
        group_keys (Dict[str, str]): per local table name, its block groups'
            family key (this rank's replica's group is used).
        full_dims (Dict[str, int]): per local table name, the whole table's dim.
    """

    def __init__(self, process_groups, group_keys: Dict[str, str], full_dims: Dict[str, int]) -> None:
        self.process_groups = process_groups
        self.group_keys = group_keys
        self.full_dims = full_dims

    @torch.no_grad()
    def __call__(self, storage, optimizer, layout, indices_N, offsets, weights_N, grad_output) -> None:
        row_ids, row_grads = storage.row_grads(layout, indices_N, offsets, weights_N, grad_output)
        for t, (ids, grad) in enumerate(zip(row_ids, row_grads)):
            name = storage.tables[t].name
            weight, state = storage.read_rows(t, ids)
            rows = weight.to(torch.float32)
            sum_of_squares = optimizer.row_sum_of_squares(rows, grad)
            group = self.process_groups.replica_subgroup(self.group_keys[name])
            dist.all_reduce(sum_of_squares, group=group)
            size = dist.get_world_size(group)
            COMM_STATS.record("column_state", 2 * (size - 1) * sum_of_squares.numel() * 4 // size)
            new_rows, new_state = optimizer.step_rows(rows, grad, state, sum_of_squares / self.full_dims[name])
            storage.write_rows(t, ids, new_rows, new_state)
