"""Slots: which feature bags every rank of a sharding group pools, in which order.

A *slot* is one feature's bags at one shard of its table. Every rank knows
every rank's slots, in one fixed order, because the all-to-alls are laid
out by them: the input all-to-all sends each rank its slots' bag lengths
and ids, the output all-to-all returns each slot's pooled columns. A rank's
slots are grouped into its *local lookups*, one fused lookup each (one
storage, one update rule): the regular shards of each storage location,
then the column blocks that agree their row state (see ``cw.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from dist_rec.modules.embedding_configs import EmbeddingBagConfig
from dist_rec.placement import EmbeddingLocation
from dist_rec.planner.plan import Shard, ShardingPlan, ShardingType
from dist_rec.sharding.schemes import scheme_for

REGULAR = "regular"
COLUMN_BLOCKS = "column_blocks"


@dataclass(frozen=True)
class Slot:
    """One feature's bags as one shard receives them."""

    feature: str
    table: int  # index into the collection's configs
    shard_index: int  # index into the table's (sorted) shards
    shard: Shard

    @property
    def name(self) -> str:
        return f"{self.feature}@{self.shard_index}"


@dataclass(frozen=True)
class LookupGroup:
    """The slots of one local lookup of a rank (contiguous in its slot order)."""

    kind: str  # REGULAR or COLUMN_BLOCKS
    location: EmbeddingLocation
    slots: Tuple[Slot, ...]


def storage_location(shard: Shard) -> EmbeddingLocation:
    """Which storage holds a shard: its location, or for a shard split over
    two tiers (``hot_rows`` of a RecShard plan), its cold tier's (the
    tiered storage of that tier holds both parts)."""
    if shard.hot_rows is not None and shard.cold_rows > 0:
        return shard.cold_location
    return shard.location


def local_table_name(table: str, shard_index: int) -> str:
    """A shard's name as its storage holds it: ``<table>@<shard index>``."""
    return f"{table}@{shard_index}"


class SlotLayout:
    """Every rank's slots and local lookups, from the tables and the plan.

    Args:
        configs: the collection's table configs, in order.
        plan (ShardingPlan): validated against ``configs``.
        group_size (int): ranks in the sharding group.
        optimizer: the fused optimizer (whether column blocks must agree
            their row state depends on it).
    """

    def __init__(self, configs: Sequence[EmbeddingBagConfig], plan: ShardingPlan, group_size: int, optimizer) -> None:
        self.configs = list(configs)
        self.plan = plan
        # Output columns in config order, as the unsharded collection.
        self.feature_names: List[str] = []
        self.feature_dims: List[int] = []
        self.feature_table: Dict[str, int] = {}
        for t, c in enumerate(self.configs):
            for f in c.feature_names:
                self.feature_names.append(f)
                self.feature_dims.append(c.embedding_dim)
                self.feature_table[f] = t

        self.shards: Dict[str, List[Shard]] = {}  # model-parallel tables only
        self.data_parallel_configs: List[EmbeddingBagConfig] = []
        # Per rank: (kind, location) -> slots, in the order groups first appear.
        grouped: List[Dict[Tuple[str, EmbeddingLocation], List[Slot]]] = [{} for _ in range(group_size)]
        for t, c in enumerate(self.configs):
            sharding = plan.tables[c.name]
            if sharding.sharding_type == ShardingType.DATA_PARALLEL:
                self.data_parallel_configs.append(c)
                continue
            shards = sorted(sharding.shards, key=lambda s: (s.row_offset, s.col_offset))
            self.shards[c.name] = shards
            kind = COLUMN_BLOCKS if scheme_for(sharding.sharding_type).agrees_row_state(optimizer) else REGULAR
            for k, shard in enumerate(shards):
                for f in c.feature_names:
                    grouped[shard.rank].setdefault((kind, storage_location(shard)), []).append(Slot(f, t, k, shard))
        # Regular lookups first, column blocks last (each kind by location).
        self.groups_by_rank: List[List[LookupGroup]] = [
            [LookupGroup(kind, loc, tuple(slots)) for kind in (REGULAR, COLUMN_BLOCKS) for (k, loc), slots in g.items() if k == kind]
            for g in grouped
        ]
        self.slots_by_rank: List[List[Slot]] = [[s for group in groups for s in group.slots] for groups in self.groups_by_rank]
        all_slots = [s for slots in self.slots_by_rank for s in slots]
        self.slot_index: Dict[Tuple[str, int], int] = {(s.feature, s.shard_index): i for i, s in enumerate(all_slots)}
        self.widths: List[int] = [sum(s.shard.num_cols for s in slots) for slots in self.slots_by_rank]

    def row_split(self, table: str) -> bool:
        """Whether the table's bags are split by row range over its shards
        (row-wise, table-row-wise): each shard then pools a partial sum."""
        sharding_type = self.plan.tables[table].sharding_type
        return sharding_type != ShardingType.DATA_PARALLEL and scheme_for(sharding_type).bucketed

    def data_parallel_features(self) -> List[str]:
        return [f for c in self.data_parallel_configs for f in c.feature_names]

