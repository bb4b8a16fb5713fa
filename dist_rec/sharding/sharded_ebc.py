"""``ShardedEmbeddingBagCollection``: an ``EmbeddingBagCollection`` whose
tables are spread over the ranks of a sharding group by a ``ShardingPlan``.

One step, seen from rank l of a group of L ranks:

1. *Input dist* (``input_dist.py``). Each feature's ids are routed to the
   shards of its table by its sharding type's rule (whole bags for table-
   and column-wise, bucketised by row range for row-wise). One all-to-all
   of bag lengths and ids (and one of per-id weights) inside the group
   delivers every rank the bags of all samples of the group for the slots
   it holds (``slots.py``).
2. *Lookup* (``lookup.py``). The local shards live in storages
   (``dist_rec.placement``, one per location); one fused lookup per
   storage pools them for the group's whole batch.
3. *Output dist* (``output_dist.py``). An all-to-all sends each sample's
   pooled shard columns back to the rank that owns the sample, which
   assembles them (column blocks side by side, row blocks summed).

The backward runs the output all-to-all in reverse and hands each local
lookup the gradient of its pooled columns; its update rule then steps the
local rows in place (the fused kernel; ``cw.py`` and ``dp.py`` add what
column blocks and data-parallel tables need). No dense gradient of a table
exists anywhere.

Data-parallel tables keep a full copy on every rank and agree their updates
over every rank (``dp.py``). Under 2D parallelism the sharding group is one
replica of the tables; ``sync_replicas`` averages the replicas over the
replica group. Every group comes from the process-group owner
(``dist_rec.distributed.ProcessGroups``), asked again at each use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dist_rec.distributed import ProcessGroups, default_process_groups
from dist_rec.modules.embedding_configs import EmbeddingBagConfig, as_embedding_bag_config
from dist_rec.modules.embedding_modules import EmbeddingBagCollection, _check_configs, state_dict_key
from dist_rec.optim.fused import FusedOptimizer, MomentumScaledRowWiseAdagrad
from dist_rec.placement import EmbeddingLocation, EmbeddingStorage, TableSpec, create_storage
from dist_rec.placement.tiered import TieredStorage
from dist_rec.planner.plan import Shard, ShardingPlan, ShardingType
from dist_rec.sharding.comm import COMM_STATS, all_reduce_mean_, feature_major
from dist_rec.sharding.cw import ColumnBlockUpdate, column_block_group_key
from dist_rec.sharding.dp import DataParallelUpdate, DataParallelUpdateExchange
from dist_rec.sharding.input_dist import InputDistState, SparseFeaturesDist
from dist_rec.sharding.lookup import FusedUpdate, LocalLookup
from dist_rec.sharding.output_dist import PooledEmbeddingsDist
from dist_rec.sharding.schemes import scheme_for
from dist_rec.sharding.slots import COLUMN_BLOCKS, LookupGroup, Slot, SlotLayout, local_table_name
from dist_rec.sparse.jagged_tensor import KeyedTensor


@dataclass
class LocalShard:
    """A shard this rank holds, and the door to its rows: ``read()`` gives
    its weight block and row-wise state (live views in memory, copies
    elsewhere), ``write()`` stores them back."""

    table: str
    shard: Shard
    storage: EmbeddingStorage
    index: int  # the shard's table index in its storage

    @property
    def state_names(self) -> Tuple[str, ...]:
        return self.storage.state_names

    def read(self, start: int = 0, count: Optional[int] = None):
        return self.storage.read_block(self.index, start, count)

    def write(self, weight: Optional[torch.Tensor] = None, state: Optional[Dict[str, torch.Tensor]] = None, start: int = 0) -> None:
        self.storage.write_block(self.index, start, weight, state)


class ShardedEmbeddingBagCollection(nn.Module):
    """Tables sharded over a group; forward like ``EmbeddingBagCollection``.

    Args:
        tables: the table configs (ours or TorchRec's).
        plan (ShardingPlan): how each table is split over the group's ranks,
            and where each shard's rows are stored.
        optimizer (FusedOptimizer): the fused sparse optimizer (required:
            sharded tables train only with a fused optimizer).
        is_weighted (bool): bags carry per-id weights. (Default: False)
        process_groups (Optional[ProcessGroups]): the owner of the sharding
            group (and, in 2D, the replica group) this collection runs on.
            (Default: one replica over every rank)
        device: where local shards live. (Default: CPU)
        source (EmbeddingBagCollection): unsharded collection to copy the
            initial rows and optimizer state from (each rank copies its own
            shards). Without it shards start from the configs' uniform init.
        storage_dir (Optional[str]): where shards placed on ``ssd`` keep
            their files (each rank in its own sub-directory).
        row_orders (Optional[Dict[str, array]]): per table, its row ids
            hottest first (``AccessStats``' ``hot_order``): a shard the plan
            splits over two tiers keeps its hottest ``hot_rows`` in memory.
            Tables without one split in their own row order.
        initial_sync (bool): broadcast the replicas' shards and the
            data-parallel tables so they start equal (collectives); False
            for a process joining a running job, whose state it receives
            afterwards. (Default: True)

    Example::

        groups = ProcessGroups(replicas=1)
        plan = uniform_plan(tables, "row_wise", groups.grid.group_size)
        sharded = ShardedEmbeddingBagCollection(tables, plan, RowWiseAdagrad(lr=0.05), process_groups=groups)
        out = sharded(kjt)    # this rank's samples, [B, sum of dims]
    """

    def __init__(
        self,
        tables: Sequence,
        plan: ShardingPlan,
        optimizer: FusedOptimizer,
        is_weighted: bool = False,
        process_groups: Optional[ProcessGroups] = None,
        device: Optional[torch.device] = None,
        source: Optional[EmbeddingBagCollection] = None,
        storage_dir: Optional[str] = None,
        initial_sync: bool = True,
        row_orders: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        configs = [as_embedding_bag_config(t) for t in tables]
        _check_configs(configs)
        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(f"Invalid optimizer={optimizer!r}. Sharded tables train with a dist_rec.optim fused optimizer.")
        self._device = torch.device(device if device is not None else "cpu")
        self._groups = process_groups if process_groups is not None else default_process_groups(self._device)
        _check_plan(plan, configs, self._groups.grid.group_size)
        self.plan = plan
        self._configs = configs
        self._is_weighted = is_weighted
        self._optimizer = optimizer
        self._storage_dir = storage_dir
        self._row_orders = dict(row_orders or {})

        self.layout = SlotLayout(configs, plan, self._groups.grid.group_size, optimizer)
        self._init_ranges: List[Tuple[EmbeddingStorage, List[Tuple[float, float]]]] = []
        self._lookups: List[LocalLookup] = self._model_parallel_lookups()
        self.data_parallel: Optional[LocalLookup] = self._data_parallel_lookup()
        self._input_dist = SparseFeaturesDist(
            self.layout, self._groups, is_weighted, self._device, agreement_group=lambda: self._data_parallel_group()
        )
        self._output_dist = PooledEmbeddingsDist(self.layout, self._groups)
        self._row_orders = {}  # the storages hold what they need of them
        self._initialise(source, initial_sync)

    # -- building the local lookups -------------------------------------------

    @property
    def _group_rank(self) -> int:
        return self._groups.grid.my_sharding_group.index(self._groups.rank)

    def _model_parallel_lookups(self) -> List[LocalLookup]:
        """One lookup per group of this rank's slots (``slots.py``), in slot
        order. Column blocks' row-state groups are made first: a collective
        over every rank, for every replica's copy of every such table."""
        group_keys = self._column_block_groups()
        lookups = []
        for group in self.layout.groups_by_rank[self._group_rank]:
            lookups.append(self._lookup_of(group, group_keys))
        return lookups

    def _lookup_of(self, group: LookupGroup, group_keys: Dict[str, str]) -> LocalLookup:
        tables: Dict[str, int] = {}  # local table name -> its index in the storage
        specs: List[TableSpec] = []
        init: List[Tuple[float, float]] = []
        slot_tables, slot_pooling = [], []
        full_dims: Dict[str, int] = {}
        for s in group.slots:
            config = self._configs[s.table]
            name = local_table_name(config.name, s.shard_index)
            if name not in tables:
                tables[name] = len(specs)
                specs.append(TableSpec(name, s.shard.num_rows, s.shard.num_cols, config.dtype))
                init.append((config.weight_init_min, config.weight_init_max))
                full_dims[name] = config.embedding_dim
            slot_tables.append(tables[name])
            slot_pooling.append(scheme_for(self.plan.tables[config.name].sharding_type).shard_pooling(config.pooling))
        first_slots = _first_slot_per_table(group.slots)
        if any(s.shard.hot_rows is not None and s.shard.cold_rows > 0 for s in first_slots):
            # Split shards (and any whole shard of the same cold tier, with no hot rows).
            hot_rows = [s.shard.hot_rows or 0 for s in first_slots]
            orders = [self._shard_order(s) for s in first_slots]
            storage = self._tiered_storage(group.location, specs, f"{group.kind}_tiered_{group.location.value}", hot_rows, orders)
        else:
            storage = self._storage(group.location, specs, f"{group.kind}_{group.location.value}")
        self._init_ranges.append((storage, init))
        if group.kind == COLUMN_BLOCKS:
            keys = {name: group_keys[name.rsplit("@", 1)[0]] for name in tables}
            update = ColumnBlockUpdate(self._groups, keys, full_dims)
        else:
            update = FusedUpdate()
        return LocalLookup(storage, slot_tables, slot_pooling, self._optimizer, update, self._is_weighted)

    def _column_block_groups(self) -> Dict[str, str]:
        """Per column-sharded table whose blocks agree their row state, the
        owner's key of the family of groups of its block ranks (one group per
        replica): a collective over every rank."""
        keys = {}
        for c in self._configs:
            sharding = self.plan.tables[c.name]
            if sharding.sharding_type != ShardingType.COLUMN_WISE or not scheme_for(sharding.sharding_type).agrees_row_state(self._optimizer):
                continue
            keys[c.name] = column_block_group_key(c.name)
            self._groups.replica_subgroups(keys[c.name], sorted(s.rank for s in sharding.shards))
        return keys

    def _data_parallel_lookup(self) -> Optional[LocalLookup]:
        """The data-parallel tables (a full copy here), updated from the global batch."""
        configs = self.layout.data_parallel_configs
        if not configs:
            return None
        self._exchange = DataParallelUpdateExchange(self._groups)
        specs = [TableSpec(c.name, c.num_embeddings, c.embedding_dim, c.dtype) for c in configs]
        storage = self._storage(EmbeddingLocation.DEVICE, specs, "data_parallel")
        self._init_ranges.append((storage, [(c.weight_init_min, c.weight_init_max) for c in configs]))
        slot_tables = [t for t, c in enumerate(configs) for _ in c.feature_names]
        slot_pooling = [c.pooling for c in configs for _ in c.feature_names]
        return LocalLookup(storage, slot_tables, slot_pooling, self._optimizer, DataParallelUpdate(self._exchange), self._is_weighted)

    def _storage(self, location: EmbeddingLocation, specs: List[TableSpec], name: str) -> EmbeddingStorage:
        directory = None
        if self._storage_dir:
            directory = str(Path(self._storage_dir) / f"rank{self._groups.rank}" / name)
        return create_storage(location, specs, self._optimizer.state_names, self._device, directory)

    def _tiered_storage(self, location, specs, name, hot_rows, orders) -> EmbeddingStorage:
        if location != EmbeddingLocation.SSD:
            raise NotImplementedError(
                f"Tables {[s.name for s in specs]} split their rows with a cold tier at {location.value!r}: "
                "tiered tables keep their cold rows on 'ssd' (CPU ranks)."
            )
        if not self._storage_dir:
            raise ValueError(
                f"Tables {[s.name for s in specs]} keep cold rows on 'ssd', but no storage directory was given "
                "(storage_dir= of the sharded collection)."
            )
        directory = Path(self._storage_dir) / f"rank{self._groups.rank}" / name
        return TieredStorage(specs, self._optimizer.state_names, self._device, directory, hot_rows, orders)

    def _shard_order(self, slot: Slot):
        """The shard's rows hottest first (local ids), from the table's order."""
        order = self._row_orders.get(self._configs[slot.table].name)
        if order is None:
            return None
        order = np.asarray(order, dtype=np.int64)
        shard = slot.shard
        inside = order[(order >= shard.row_offset) & (order < shard.row_end)]
        return inside - shard.row_offset

    def _data_parallel_group(self):
        return self._exchange.process_group

    # -- state ----------------------------------------------------------------

    @torch.no_grad()
    def _initialise(self, source: Optional[EmbeddingBagCollection], initial_sync: bool) -> None:
        """Shards from ``source`` when given (and not on the meta device),
        else the fresh uniform init; replicas then start equal (with
        ``initial_sync``). A process joining a running job
        (``initial_sync=False``) with no source leaves its rows
        uninitialised: recovery restores them (or calls
        ``reset_parameters`` when there is nothing to restore from)."""
        self.initialised = True
        if source is None or source.device.type == "meta":
            if initial_sync:
                self.reset_parameters()
            else:
                self.initialised = False
        else:
            self.reset_parameters()  # the state names the source does not keep start at zero
            rows = source.storage
            for local in self.local_shards() + self.data_parallel_tables():
                s, t = local.shard, rows.table_index(local.table)
                weight, state = rows.read_block(t, s.row_offset, s.num_rows)
                state = {name: tensor for name, tensor in state.items() if name in local.state_names}
                local.write(weight[:, s.col_offset : s.col_end], state)
        if initial_sync:
            self.broadcast_initial_state()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every local row drawn afresh from its table's uniform init range,
        the optimizer state zero."""
        for storage, init in self._init_ranges:
            storage.reset_(init)
        self.initialised = True

    @torch.no_grad()
    def broadcast_initial_state(self) -> None:
        """Makes the replicas of every shard equal to the first replica's,
        and the data-parallel copies equal to the first rank's (collectives
        over the replica and data-parallel groups)."""
        replica_group = self._groups.replica_group
        if replica_group is not None and dist.get_world_size(replica_group) > 1:
            _broadcast_shards(self.local_shards(), dist.get_process_group_ranks(replica_group)[0], replica_group)
        if self.data_parallel is not None:
            group = self._data_parallel_group()
            _broadcast_shards(self.data_parallel_tables(), dist.get_process_group_ranks(group)[0], group)

    def local_shards(self) -> List[LocalShard]:
        """The shards of model-parallel tables this rank holds."""
        out = []
        for lookup in self._lookups:
            for index, spec in enumerate(lookup.storage.tables):
                table, k = spec.name.rsplit("@", 1)
                out.append(LocalShard(table, self.layout.shards[table][int(k)], lookup.storage, index))
        return out

    def data_parallel_tables(self) -> List[LocalShard]:
        """The data-parallel tables (a full copy on every rank) as whole-table shards."""
        if self.data_parallel is None:
            return []
        storage = self.data_parallel.storage
        return [
            LocalShard(spec.name, Shard(-1, 0, spec.num_rows, 0, spec.dim), storage, index)
            for index, spec in enumerate(storage.tables)
        ]

    @torch.no_grad()
    def gather_unsharded(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, torch.Tensor]]]:
        """The tables as the unsharded collection would hold them:
        ``(state_dict, optimizer_state)``, keyed as the unsharded
        collection's ``state_dict()`` and ``optimizer_state()``. A collective over the sharding
        group; every rank gets full copies, so it is for tests, exports and
        small models."""
        weights, states = {}, {}
        for c in self._configs:
            weights[c.name] = torch.zeros(c.num_embeddings, c.embedding_dim, dtype=torch.float32, device=self._device)
            states[c.name] = {n: torch.zeros(c.num_embeddings, device=self._device) for n in self._optimizer.state_names}
        for local in self.local_shards():
            s = local.shard
            weight, state = local.read()
            weights[local.table][s.row_offset : s.row_end, s.col_offset : s.col_end] = weight
            if s.col_offset == 0:  # column blocks of a row share its state: count it once
                for name, tensor in state.items():
                    states[local.table][name][s.row_offset : s.row_end] = tensor
        for c in self._configs:
            if c.name in self.layout.shards:
                dist.all_reduce(weights[c.name], group=self.sharding_group)
                for tensor in states[c.name].values():
                    dist.all_reduce(tensor, group=self.sharding_group)
        for local in self.data_parallel_tables():
            weight, state = local.read()
            weights[local.table].copy_(weight)
            for name, tensor in state.items():
                states[local.table][name].copy_(tensor)
        dtypes = {c.name: c.dtype for c in self._configs}
        state_dict = {state_dict_key(name): w.to(dtypes[name]) for name, w in weights.items()}
        return state_dict, states

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def optimizer(self) -> FusedOptimizer:
        return self._optimizer

    @property
    def process_groups(self) -> ProcessGroups:
        return self._groups

    @property
    def sharding_group(self):
        return self._groups.sharding_group

    @property
    def replica_group(self):
        return self._groups.replica_group

    @property
    def device(self) -> torch.device:
        return self._device

    def storages(self) -> List[EmbeddingStorage]:
        """Every storage of this rank's rows: the model-parallel lookups'
        (in slot order), then the data-parallel tables'."""
        return [lookup.storage for lookup in self._lookups] + ([self.data_parallel.storage] if self.data_parallel else [])

    @torch.no_grad()
    def sync_replicas(self) -> None:
        """Agrees the replicas of every shard over the replica group (2D):
        momentum-scaled row-wise AdaGrad folds its increments in (see
        ``MomentumScaledRowWiseAdagrad.sync``); other optimizers average the
        rows and their state. With one replica only the momentum-scaled fold
        runs."""
        replica_group = self._groups.replica_group
        replicas = 1 if replica_group is None else dist.get_world_size(replica_group)
        if isinstance(self._optimizer, MomentumScaledRowWiseAdagrad):
            group = replica_group if replicas > 1 else None
            for lookup in self._lookups:
                _fold(self._optimizer, lookup.storage, group)
            if self.data_parallel is not None:  # already equal everywhere: fold only
                _fold(self._optimizer, self.data_parallel.storage, None)
            if group is not None:  # the fold all-reduces each local weight and increment (float32 on the wire)
                wire = sum(4 * (s.num_rows * s.num_cols + s.num_rows) for s in (local.shard for local in self.local_shards()))
                COMM_STATS.record("replica_sync", 2 * (replicas - 1) * wire // replicas)
            return
        if replicas > 1:
            blocks = [local.read() for local in self.local_shards()]
            all_reduce_mean_([t for weight, state in blocks for t in (weight, *state.values())], replica_group, "replica_sync")
            for local, (weight, state) in zip(self.local_shards(), blocks):
                local.write(weight, state)

    # -- lookup ---------------------------------------------------------------

    def forward(self, features) -> KeyedTensor:
        """Pools every feature of ``features`` (this rank's samples) into
        ``[B, sum of dims]`` columns in config order, as the unsharded
        collection. A collective over the sharding group: every rank calls
        it each step. Bad input on any rank stops every rank with an error
        (the others are told which rank), never a hang.

        If ``start_input_dist(features)`` was called for this very batch
        (a train pipeline, one step ahead), its ids are already here and
        only the lookup and the output all-to-all remain."""
        input_dist = self._input_dist
        state = input_dist.take_started(features, in_order=torch.is_grad_enabled())
        if state is None:
            state = input_dist.start(features, background=False) if input_dist.has_shards else input_dist.local_only(features)
        received = box = None
        if input_dist.has_shards:
            if not state.ids_started:
                input_dist.exchange_ids(state)
            input_dist.finish(state)
        by_name = {k: i for i, k in enumerate(state.keys)}
        names = self.layout.feature_names
        mean_counts = {f: state.lengths[by_name[names[f]]].clamp(min=1) for f in self._output_dist.mean_features}
        if input_dist.has_shards:
            received, box = self._output_dist.start(self._lookup(state), state.batch_sizes, mean_counts)
        data_parallel_pooled = self._lookup_data_parallel(state)
        return self._output_dist.output(received, box, state.batch, data_parallel_pooled, mean_counts)

    def _lookup(self, state: InputDistState) -> torch.Tensor:
        """Pooled ``[group batch, W_me]`` of this rank's slots for the bags
        the input dist delivered (every source rank's samples, in rank order)."""
        batch_sizes, receive_sizes = state.batch_sizes, state.receive_sizes
        my_slots = len(self.layout.slots_by_rank[self._group_rank])
        if not my_slots:
            state.received = state.received_weights = None
            return torch.zeros(sum(batch_sizes), 0, device=self._device)
        rank_lengths, rank_ids = [], []
        for q, part in enumerate(torch.split(state.received, receive_sizes)):
            bags = my_slots * batch_sizes[q]
            rank_lengths.append(part[:bags].view(my_slots, batch_sizes[q]))
            rank_ids.append(part[bags:])
        values = feature_major(rank_lengths, rank_ids)
        weights = None
        if self._is_weighted:
            weights = feature_major(rank_lengths, list(torch.split(state.received_weights, [t.numel() for t in rank_ids])))
        lengths = torch.cat(rank_lengths, dim=1)  # [slots, group batch]
        per_slot = lengths.sum(dim=1).tolist()
        parts, first, start = [], 0, 0
        for lookup in self._lookups:
            end = start + sum(per_slot[first : first + lookup.num_slots])
            parts.append(lookup(
                lengths[first : first + lookup.num_slots], values[start:end], weights[start:end] if weights is not None else None
            ))
            first, start = first + lookup.num_slots, end
        state.received = state.received_weights = None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # no copy of a lone part

    def _lookup_data_parallel(self, state: InputDistState) -> Optional[torch.Tensor]:
        """Pooled ``[B, dims]`` of the data-parallel tables' features, or None."""
        if self.data_parallel is None:
            return None
        per_feature = state.lengths.sum(dim=1).tolist()
        value_slices = torch.split(state.values, per_feature)
        weight_slices = torch.split(state.weights, per_feature) if state.weights is not None else None
        by_name = {k: i for i, k in enumerate(state.keys)}
        index = [by_name[f] for f in self.layout.data_parallel_features()]
        lengths = state.lengths[index]
        values = torch.cat([value_slices[i] for i in index])
        weights = torch.cat([weight_slices[i] for i in index]) if weight_slices is not None else None
        return self.data_parallel(lengths, values, weights)

    # -- input dist, in stages (a train pipeline runs them a step ahead) -------

    def start_input_dist(self, features) -> None:
        """Starts sending ``features``' ids to their shards (first stage:
        routing and the counts all-to-all, in the background). The matching
        ``forward(features)`` -- the same object -- picks them up. A
        collective: every rank of the group calls it, in the same order as
        its other collectives. Bad input is reported by that ``forward``,
        on every rank, not here. A no-op for a collection without
        model-parallel tables."""
        if self._input_dist.has_shards:
            self._input_dist.start_ahead(features)

    def drop_in_flight(self) -> None:
        """Forgets every batch whose input dist was started ahead: after a
        failed step their collectives belong to groups that are gone
        (recovery rebuilds the groups and starts the stream again)."""
        self._input_dist.started.clear()

    def continue_input_dist(self) -> None:
        """Second stage for every started batch: waits for its counts and
        starts the all-to-all of its lengths and ids (in the background).
        Call it after the forward of the current batch, before its backward,
        so that the ids travel while the backward computes."""
        self._input_dist.continue_started()


def _check_plan(plan: ShardingPlan, configs: Sequence[EmbeddingBagConfig], group_size: int) -> None:
    if plan.world_size != group_size:
        raise ValueError(f"The plan is for {plan.world_size} ranks; the sharding group has {group_size}.")
    plan.validate(c.name for c in configs)
    for c in configs:
        t = plan.tables[c.name]
        if t.num_embeddings != c.num_embeddings or t.embedding_dim != c.embedding_dim:
            raise ValueError(
                f"The plan has table {c.name!r} as {t.num_embeddings} x {t.embedding_dim}; "
                f"the model has {c.num_embeddings} x {c.embedding_dim}."
            )


def _broadcast_shards(shards: Sequence[LocalShard], source: int, group) -> None:
    """Every rank of ``group`` takes ``source``'s rows and state of ``shards``."""
    for local in shards:
        weight, state = local.read()
        dist.broadcast(weight, src=source, group=group)
        for tensor in state.values():
            dist.broadcast(tensor, src=source, group=group)
        local.write(weight, state)


def _fold(optimizer: MomentumScaledRowWiseAdagrad, storage: EmbeddingStorage, group) -> None:
    """Momentum-scaled sync of one storage's tables (``optimizer.sync``)."""
    blocks = [storage.read_block(t) for t in range(storage.num_tables)]
    optimizer.sync([w for w, _ in blocks], [s for _, s in blocks], group)
    for t, (weight, state) in enumerate(blocks):
        storage.write_block(t, 0, weight, state)


def _first_slot_per_table(slots: Sequence[Slot]) -> List[Slot]:
    """One slot per local table, in the order the storage numbers them."""
    seen, first = set(), []
    for s in slots:
        key = (s.table, s.shard_index)
        if key not in seen:
            seen.add(key)
            first.append(s)
    return first
