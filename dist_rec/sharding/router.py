"""Routing every id of a batch to the shards that pool it, in one pass.

The per-type rules (``scheme.py``: whole bags for table- and column-wise,
bucketised by row range for row-wise) applied one feature at a time cost a
dozen small tensor ops per feature and shard; with tens of features that
Python overhead dominates a step. ``Router`` applies them to all features
at once: each id gets the *slot* (feature, shard) it goes to, one stable
sort groups the ids by slot (bag order kept), and one ``bincount`` gives
every slot's bag lengths. Slots are numbered destination-major, so the
result splits straight into the per-rank payloads of the input all-to-all.
``tests/sharding/test_router.py`` checks it against the per-feature
``ShardingScheme.route``. On the CPU the row-wise split is one native op
(``dist_rec.ops.bucketize_by_rows``: two passes over the ids, a stable
counting sort by slot); ``_bucketise_with_tensor_ops`` is its tensor-op
form, used on other devices and as the op's reference in
``tests/sharding/test_router.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from dist_rec.ops.bucketize import bucketize_by_rows

_NO_SHARD = torch.iinfo(torch.int64).max  # bound of a shard a feature does not have


@dataclass
class Routed:
    """A batch's ids grouped by slot (destination-major slot order)."""

    lengths: torch.Tensor  # [slots, B] bag lengths per slot
    ids: torch.Tensor  # ids local to their shard, grouped by slot, bag order kept
    weights: Optional[torch.Tensor]  # per-id weights in the same order
    ids_per_rank: List[int]  # how many of ``ids`` go to each rank


class Router:
    """Routes ids of features in one key order to a collection's slots.

    Args:
        slot_of (Sequence[Sequence[int]]): per input feature (key order), the
            global slot index of each of its table's shards (empty for a
            feature not routed here, e.g. a data-parallel one).
        row_offsets (Sequence[Sequence[int]]): per input feature, the first
            row of each shard (row-wise: the bucket boundaries).
        bucketed (Sequence[bool]): per feature, whether ids are bucketised
            by row (row-wise) or sent to every shard whole (table- and
            column-wise).
        slots_per_rank (Sequence[int]): how many slots each rank holds.

    Whole-bag features need no per-id work: their slots receive the
    feature's slice as it is. Only bucketised features are split id by id
    (one vectorised pass over all of them and a stable sort on a 16-bit key).
    """

    def __init__(self, slot_of, row_offsets, bucketed, slots_per_rank, device) -> None:
        self.slots_per_rank = list(slots_per_rank)
        self.num_slots = sum(self.slots_per_rank)
        # Per slot: (input feature, bucketised?) -- slots are destination-major.
        self.slot_feature = [0] * self.num_slots
        self.slot_bucketed = [False] * self.num_slots
        self.bucketed_features = [f for f, b in enumerate(bucketed) if b and slot_of[f]]
        for f, slots in enumerate(slot_of):
            for slot in slots:
                self.slot_feature[slot] = f
                self.slot_bucketed[slot] = bool(bucketed[f])
        widest = max([len(slot_of[f]) for f in self.bucketed_features] + [1])
        slot_table = torch.zeros((len(self.bucketed_features), widest), dtype=torch.int64)
        bounds = torch.full((len(self.bucketed_features), widest), _NO_SHARD, dtype=torch.int64)
        for i, f in enumerate(self.bucketed_features):
            slot_table[i, : len(slot_of[f])] = torch.tensor(slot_of[f])
            bounds[i, : len(row_offsets[f])] = torch.tensor(row_offsets[f])
        self.widest = widest
        self.slot_table_2d = slot_table.to(device)
        self.slot_table = self.slot_table_2d.reshape(-1)
        self.bounds = bounds.to(device)
        self.offsets = bounds.clamp(max=2**62).reshape(-1).to(device)
        self.key_dtype = torch.int16 if self.num_slots < 2**15 else torch.int32
        self._bag_number_cache: dict = {}

    def route(self, lengths: torch.Tensor, ids: torch.Tensor, weights: Optional[torch.Tensor]) -> Routed:
        """``lengths`` ``[F, B]`` and ``ids`` (feature-major, int64) of one
        rank's batch; ``weights`` per id or None."""
        batch = lengths.shape[1]
        per_feature = lengths.sum(dim=1).tolist()
        id_slices = torch.split(ids, per_feature)
        weight_slices = torch.split(weights, per_feature) if weights is not None else None
        slot_ids: List[torch.Tensor] = [None] * self.num_slots
        slot_weights: List[torch.Tensor] = [None] * self.num_slots
        slot_lengths: List[torch.Tensor] = [None] * self.num_slots
        for slot, (f, bucketed) in enumerate(zip(self.slot_feature, self.slot_bucketed)):
            if not bucketed:
                slot_ids[slot], slot_lengths[slot] = id_slices[f], lengths[f]
                if weights is not None:
                    slot_weights[slot] = weight_slices[f]
        if self.bucketed_features:
            self._bucketise(lengths, ids, id_slices, weight_slices, batch, slot_ids, slot_weights, slot_lengths)
        counts = [t.numel() for t in slot_ids]
        ids_per_rank, start = [], 0
        for n in self.slots_per_rank:
            ids_per_rank.append(sum(counts[start : start + n]))
            start += n
        empty_lengths = lengths.new_zeros(self.num_slots, batch)
        return Routed(
            lengths=torch.stack(slot_lengths) if slot_lengths else empty_lengths,
            ids=torch.cat(slot_ids) if slot_ids else ids[:0],
            weights=(torch.cat(slot_weights) if slot_weights else weights[:0]) if weights is not None else None,
            ids_per_rank=ids_per_rank,
        )

    def _bag_numbers(self, batch: int, device) -> torch.Tensor:
        """``0 .. batch - 1`` once per bucketised feature (cached per batch size)."""
        numbers = self._bag_number_cache.get(batch)
        if numbers is None:
            numbers = torch.arange(batch, device=device).repeat(len(self.bucketed_features))
            self._bag_number_cache = {batch: numbers}  # batch sizes rarely change: keep the last
        return numbers

    def _bucketise(self, lengths, all_ids, id_slices, weight_slices, batch, slot_ids, slot_weights, slot_lengths) -> None:
        """Splits the ids of every row-wise feature by row block, in one pass."""
        features = self.bucketed_features
        every = features == list(range(len(id_slices)))  # all features row-wise: the batch's ids as they are
        ids = all_ids if every else torch.cat([id_slices[f] for f in features])
        sub_lengths = lengths.index_select(0, torch.tensor(features, device=lengths.device))
        weights = None
        if weight_slices is not None:
            weights = torch.cat(weight_slices) if every else torch.cat([weight_slices[f] for f in features])
        if ids.device.type == "cpu":
            local, per_slot_lengths, order = bucketize_by_rows(
                ids.contiguous(), sub_lengths.to(torch.int64).contiguous(), self.bounds, self.slot_table_2d, self.num_slots, weights is not None
            )
            per_slot_lengths = per_slot_lengths.to(lengths.dtype)
        else:
            local, per_slot_lengths, order = self._bucketise_with_tensor_ops(ids, sub_lengths, batch)
        per_slot = per_slot_lengths.sum(dim=1).tolist()
        grouped = torch.split(local, per_slot)
        grouped_weights = torch.split(weights.index_select(0, order), per_slot) if weights is not None else None
        for s, bucketed in enumerate(self.slot_bucketed):
            if bucketed:
                slot_ids[s], slot_lengths[s] = grouped[s], per_slot_lengths[s]
                if grouped_weights is not None:
                    slot_weights[s] = grouped_weights[s]

    def _bucketise_with_tensor_ops(self, ids, sub_lengths, batch):
        """``bucketize_by_rows`` in tensor ops: (local ids grouped by slot,
        per-slot bag lengths ``[slots, B]``, each output id's input position)."""
        device = ids.device
        counts = sub_lengths.sum(dim=1)
        which = torch.repeat_interleave(torch.arange(len(self.bucketed_features), device=device), counts, output_size=ids.numel())
        block = (ids[:, None] >= self.bounds.index_select(0, which)).sum(dim=1) - 1
        flat = which * self.widest + block
        slot = self.slot_table.index_select(0, flat)
        local = ids - self.offsets.index_select(0, flat)
        bag = torch.repeat_interleave(self._bag_numbers(batch, device), sub_lengths.reshape(-1), output_size=ids.numel())
        order = torch.sort(slot.to(self.key_dtype), stable=True).indices
        per_slot_lengths = torch.bincount(slot * batch + bag, minlength=self.num_slots * batch).view(self.num_slots, batch)
        return local.index_select(0, order), per_slot_lengths, order


def payload(routed: Routed, slots_per_rank: Sequence[int]) -> torch.Tensor:
    """The input all-to-all's buffer: per destination rank, its slots' bag
    lengths then their ids."""
    lengths = torch.split(routed.lengths.reshape(-1), [n * routed.lengths.shape[1] for n in slots_per_rank])
    ids = torch.split(routed.ids, routed.ids_per_rank)
    return torch.cat([t for pair in zip(lengths, ids) for t in pair])
