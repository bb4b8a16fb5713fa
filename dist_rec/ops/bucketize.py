"""Python face of ``dist_rec::bucketize_by_rows`` (``csrc/sharding/bucketize_cpu.cpp``).

Row-wise sharding splits every id of a batch by the row block that holds it.
The op does it for all row-wise features of a batch in two passes: it finds
each id's block and counts the per-slot bag lengths, then groups the ids by
slot with a stable counting sort (bag order kept inside every slot). Its
tensor-op form, used on other devices and as its reference, is
``dist_rec.sharding.router.Router._bucketise_with_tensor_ops``.

Shape legend: N ids, F' row-wise features, B bags per feature, K widest
shard count, S slots.
"""

from __future__ import annotations

from typing import Tuple

import torch

import dist_rec._C  # noqa: F401  registers torch.ops.dist_rec.bucketize_by_rows


@torch.library.register_fake("dist_rec::bucketize_by_rows")
def _bucketize_by_rows_fake(ids, lengths, bounds, slot_table, num_slots, with_order):
    return (
        ids.new_empty(ids.shape),
        lengths.new_empty(num_slots, lengths.shape[1]),
        ids.new_empty(ids.shape[0] if with_order else 0),
    )


def bucketize_by_rows(
    ids_N: torch.Tensor,
    lengths_FB: torch.Tensor,
    bounds_FK: torch.Tensor,
    slot_table_FK: torch.Tensor,
    num_slots: int,
    with_order: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids local to their shard grouped by slot [N], per-slot bag lengths
    [S, B], each output id's input position [N] or empty)``.

    ``bounds_FK[f, k]`` is the first row of feature f's k-th shard (int64 max
    past its last), ``slot_table_FK[f, k]`` that shard's slot; ``with_order``
    asks for the permutation (to carry per-id weights along)."""
    return torch.ops.dist_rec.bucketize_by_rows(ids_N, lengths_FB, bounds_FK, slot_table_FK, num_slots, with_order)
