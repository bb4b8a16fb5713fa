"""``ShardedEmbeddingBagCollection``: an ``EmbeddingBagCollection`` whose
tables are spread over the ranks of a sharding group by a ``ShardingPlan``.

One step, seen from rank l of a group of L ranks:

1. *Input dist.* Each feature's ids are routed to the shards of its table
   (``scheme.py``: whole bags for table- and column-wise, bucketised by row
   range for row-wise). One all-to-all of bag lengths and ids (and one of
   per-id weights) inside the group delivers every rank the bags of all
   samples of the group for the shards it holds.
2. *Lookup.* The local shards are the tables of an ordinary fused
   ``EmbeddingBagCollection``; one fused lookup pools all of them for the
   group's whole batch.
3. *Output dist.* An all-to-all sends each sample's pooled shard columns
   back to the rank that owns the sample, which adds them into place
   (``index_add``: column blocks side by side, row blocks summed).

The backward runs the output all-to-all in reverse and hands each rank the
gradient of its shards' pooled columns; the fused optimizer then updates the
local rows in place. No dense gradient of a table exists anywhere.

Data-parallel tables keep a full copy on every rank and agree their updates
over the data-parallel group (``dp_sharding.py``). Under 2D parallelism the
sharding group is one replica of the tables; ``sync_replicas`` averages the
replicas over the replica group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dist_rec.modules.embedding_configs import EmbeddingBagConfig, PoolingType, as_embedding_bag_config
from dist_rec.modules.embedding_modules import EmbeddingBagCollection, _check_configs, check_feature_keys
from dist_rec.optim.fused import FusedOptimizer, MomentumScaledRowWiseAdagrad
from dist_rec.sharding.column_wise import ColumnBlockUpdate, ColumnWise
from dist_rec.sharding.comm import (
    COMM_STATS,
    all_reduce_mean_,
    all_to_all,
    feature_major_order,
    finish_output_dist,
    start_output_dist,
)
from dist_rec.sharding.dp_sharding import DataParallelUpdateExchange
from dist_rec.sharding.plan import Shard, ShardingPlan
from dist_rec.sharding.router import Routed, Router
from dist_rec.sharding.router import payload as routed_payload
from dist_rec.sharding.row_wise import RowWise
from dist_rec.sharding.scheme import ShardingScheme
from dist_rec.sharding.shm_transport import intra_host_all_to_all
from dist_rec.sharding.table_row_wise import TableRowWise
from dist_rec.sharding.table_wise import TableWise
from dist_rec.sparse.jagged_tensor import FeatureBlocks, KeyedJaggedTensor, KeyedTensor

SCHEMES: Dict[str, ShardingScheme] = {
    s.sharding_type: s for s in (TableWise(), RowWise(), ColumnWise(), TableRowWise())
}


@dataclass(frozen=True)
class _Slot:
    """One feature's bags as one shard receives them."""

    feature: str
    table: int  # index into the collection's configs
    shard_index: int  # index into the table's (sorted) shards
    shard: Shard

    @property
    def name(self) -> str:
        return f"{self.feature}@{self.shard_index}"


@dataclass
class _InputDist:
    """One batch's input dist on its way (see ``start_input_dist``)."""

    features: object  # the batch as given: a later forward matches it by identity
    keys: List[str]
    batch: int = 0
    lengths: Optional[torch.Tensor] = None  # [F, B] int64
    values: Optional[torch.Tensor] = None  # int64, feature-major
    weights: Optional[torch.Tensor] = None
    routed: Optional[Routed] = None
    error: Optional[Exception] = None  # this rank's input was refused, for this reason
    refused_by: Optional[int] = None  # the first rank of the group that refused its input
    received_counts: Optional[torch.Tensor] = None
    ids_started: bool = False
    background: bool = True  # collectives run asynchronously (started ahead by a pipeline)
    batch_sizes: Optional[List[int]] = None
    receive_sizes: Optional[List[int]] = None
    received: Optional[torch.Tensor] = None
    received_weights: Optional[torch.Tensor] = None
    works: List = field(default_factory=list)  # collectives still in flight


@dataclass
class LocalShard:
    """A shard this rank holds, for checkpoints: live tensors."""

    table: str
    shard: Shard
    weight: torch.Tensor  # [num_rows, num_cols]
    state: Dict[str, torch.Tensor]  # optimizer state, one value per row


def local_table_name(table: str, shard_index: int) -> str:
    return f"{table}@{shard_index}"


class ShardedEmbeddingBagCollection(nn.Module):
    """Tables sharded over a group; forward like ``EmbeddingBagCollection``.

    Args:
        tables: the table configs (ours or TorchRec's).
        plan (ShardingPlan): how each table is split over the group's ranks.
        optimizer (FusedOptimizer): the fused sparse optimizer (required:
            sharded tables train only with a fused optimizer).
        is_weighted (bool): bags carry per-id weights. (Default: False)
        sharding_group: the ranks that share one copy of the tables.
            (Default: the whole world)
        replica_group: the ranks holding the same shards in the other
            sharding groups (2D parallelism), or None for one replica.
        data_parallel_group: ranks over which data-parallel tables agree
            their updates. (Default: the whole world)
        device: where local shards live. (Default: CPU)
        source (EmbeddingBagCollection): unsharded collection to copy the
            initial rows and optimizer state from (each rank copies its own
            shards). Without it shards start from the configs' uniform init.
        all_sharding_groups: the global ranks of every sharding group (2D),
            so that every rank creates the same sub-groups. (Default: the
            sharding group alone)
    """

    def __init__(
        self,
        tables: Sequence,
        plan: ShardingPlan,
        optimizer: FusedOptimizer,
        is_weighted: bool = False,
        sharding_group: Optional[dist.ProcessGroup] = None,
        replica_group: Optional[dist.ProcessGroup] = None,
        data_parallel_group: Optional[dist.ProcessGroup] = None,
        device: Optional[torch.device] = None,
        source: Optional[EmbeddingBagCollection] = None,
        all_sharding_groups: Optional[Sequence[Sequence[int]]] = None,
    ) -> None:
        super().__init__()
        configs = [as_embedding_bag_config(t) for t in tables]
        _check_configs(configs)
        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(f"Invalid optimizer={optimizer!r}. Sharded tables train with a dist_rec.optim fused optimizer.")
        self._group = sharding_group if sharding_group is not None else dist.group.WORLD
        self._group_size = dist.get_world_size(self._group)
        self._group_rank = dist.get_rank(self._group)
        sharding_group_ranks = [list(g) for g in all_sharding_groups] if all_sharding_groups else [
            dist.get_process_group_ranks(self._group)
        ]
        if plan.world_size != self._group_size:
            raise ValueError(
                f"The plan is for {plan.world_size} ranks; the sharding group has {self._group_size}."
            )
        plan.validate(c.name for c in configs)
        for c in configs:
            if plan.tables[c.name].num_embeddings != c.num_embeddings or plan.tables[c.name].embedding_dim != c.embedding_dim:
                t = plan.tables[c.name]
                raise ValueError(
                    f"The plan has table {c.name!r} as {t.num_embeddings} x {t.embedding_dim}; "
                    f"the model has {c.num_embeddings} x {c.embedding_dim}."
                )
        self.plan = plan
        self._configs = configs
        self._is_weighted = is_weighted
        self._optimizer = optimizer
        self._replica_group = replica_group
        self._device = torch.device(device if device is not None else "cpu")

        # Output columns in config order, as the unsharded collection.
        self._feature_names, self._feature_dims, self._feature_table = [], [], {}
        for t, c in enumerate(configs):
            for f in c.feature_names:
                self._feature_names.append(f)
                self._feature_dims.append(c.embedding_dim)
                self._feature_table[f] = t

        # Slots: what each rank of the group pools, in one fixed order. Column
        # blocks under a row-wise optimizer come last: they update through
        # ``ColumnBlockUpdate`` (state agreed over the whole row).
        self._exact_columns = bool(optimizer.state_names)
        self._shards: Dict[str, List[Shard]] = {}
        regular: List[List[_Slot]] = [[] for _ in range(self._group_size)]
        column_blocks: List[List[_Slot]] = [[] for _ in range(self._group_size)]
        dp_configs = []
        for t, c in enumerate(configs):
            sharding = plan.tables[c.name]
            if sharding.sharding_type == "data_parallel":
                dp_configs.append(c)
                continue
            shards = sorted(sharding.shards, key=lambda s: (s.row_offset, s.col_offset))
            self._shards[c.name] = shards
            separate = self._exact_columns and sharding.sharding_type == "column_wise"
            for k, shard in enumerate(shards):
                for f in c.feature_names:
                    (column_blocks if separate else regular)[shard.rank].append(_Slot(f, t, k, shard))
        self._slots_by_rank = [a + b for a, b in zip(regular, column_blocks)]
        self._my_slots = self._slots_by_rank[self._group_rank]
        all_slots = [s for slots in self._slots_by_rank for s in slots]
        self._slot_index = {(s.feature, s.shard_index): i for i, s in enumerate(all_slots)}
        self._routers: Dict[Tuple[str, ...], Router] = {}
        self._num_regular_slots = len(regular[self._group_rank])
        self._widths = [sum(s.shard.num_cols for s in slots) for slots in self._slots_by_rank]

        # The local shards are the tables of ordinary fused collections.
        self.local = self._local_collection(regular[self._group_rank])
        self.local_columns = self._local_collection(column_blocks[self._group_rank])
        if any(column_blocks):
            block_groups = self._column_block_groups(configs, sharding_group_ranks)  # a collective: every rank
            if self.local_columns is not None:
                self.local_columns._apply_fused_update = ColumnBlockUpdate(
                    self.local_columns, block_groups, {c.name: c.embedding_dim for c in configs}
                )

        self.data_parallel = None
        if dp_configs:
            self.data_parallel = EmbeddingBagCollection(dp_configs, is_weighted=is_weighted, device=self._device, optimizer=optimizer)
            group = data_parallel_group if data_parallel_group is not None else dist.group.WORLD
            self._dp_group = dist.new_group(ranks=None if group is dist.group.WORLD else dist.get_process_group_ranks(group))
            self.data_parallel._update_exchange = DataParallelUpdateExchange(self._dp_group)

        # How the output is assembled from the pieces that come back (one per
        # slot, rank-major, then the data-parallel features): per feature, its
        # column groups in column order, each the sum of its row shards.
        piece = 0
        groups: Dict[str, Dict[int, List[int]]] = {f: {} for f in self._feature_names}
        for slots in self._slots_by_rank:
            for s in slots:
                groups[s.feature].setdefault(s.shard.col_offset, []).append(piece)
                piece += 1
        self._dp_feature_dims = []
        for c in dp_configs:
            for f in c.feature_names:
                groups[f][0] = [piece]
                piece += 1
                self._dp_feature_dims.append(c.embedding_dim)
        self._assembly = [[groups[f][col] for col in sorted(groups[f])] for f in self._feature_names]
        self._slot_widths = [[s.shard.num_cols for s in slots] for slots in self._slots_by_rank]
        # Mean pooling of row-split tables divides after the partial sums are
        # joined; shards that see whole bags pool means themselves.
        self._mean_features = {
            i for i, f in enumerate(self._feature_names)
            if configs[self._feature_table[f]].pooling == PoolingType.MEAN
            and self._row_split(configs[self._feature_table[f]].name)
        }
        self._row_sums = self._aligned_row_shards(bool(dp_configs))
        self._block_layout = self._features_in_blocks(bool(dp_configs))
        self._row_limits: Dict[Tuple[str, ...], torch.Tensor] = {}
        self._prefetched: List[_InputDist] = []  # batches whose input dist was started, in order

        self._initialise(source)
        # A collective: ranks of one host exchange ids and pooled rows through
        # shared memory (gloo's loopback sockets otherwise).
        intra_host_all_to_all(self._group, self._device)

    def _aligned_row_shards(self, has_data_parallel: bool) -> bool:
        """Whether the output is the plain sum of the ranks' blocks: every
        rank of the group holds one whole-width row shard of every feature,
        in config feature order (row-wise sharding of every table), and no
        feature is data-parallel. Mean-pooled features are divided after."""
        if has_data_parallel or len(self._slots_by_rank) < 2:
            return False
        layout = [(s.feature, s.shard.col_offset, s.shard.num_cols) for s in self._slots_by_rank[0]]
        whole = [(f, 0, dim) for f, dim in zip(self._feature_names, self._feature_dims)]
        return layout == whole and all(
            [(s.feature, s.shard.col_offset, s.shard.num_cols) for s in slots] == layout for slots in self._slots_by_rank
        )

    def _row_split(self, table: str) -> bool:
        """Whether the table's bags are split by row range over its shards
        (row-wise, table-row-wise): each shard then pools a partial sum."""
        sharding_type = self.plan.tables[table].sharding_type
        return sharding_type != "data_parallel" and SCHEMES[sharding_type].bucketed

    def _features_in_blocks(self, has_data_parallel: bool) -> Optional[Tuple[List[int], List[int]]]:
        """``(feature_block, feature_column)`` when every feature's pooled
        columns come back whole from one rank (table-wise, no row or column
        split, no data-parallel table, no mean left to take): the output
        can then be handed over as ``FeatureBlocks``, the received buffer
        as it is. Else None."""
        if has_data_parallel or self._mean_features:
            return None
        dims = dict(zip(self._feature_names, self._feature_dims))
        where: Dict[str, Tuple[int, int]] = {}
        for rank, slots in enumerate(self._slots_by_rank):
            column = 0
            for s in slots:
                if s.feature in where or s.shard.num_cols != dims[s.feature]:
                    return None  # split over shards
                where[s.feature] = (rank, column)
                column += s.shard.num_cols
        if set(where) != set(self._feature_names):
            return None
        return [where[f][0] for f in self._feature_names], [where[f][1] for f in self._feature_names]

    def _local_collection(self, slots: List[_Slot]) -> Optional[EmbeddingBagCollection]:
        """A fused collection with one table per local shard of ``slots``."""
        features: Dict[str, List[str]] = {}  # local table -> its slots' names, in order
        for s in slots:
            features.setdefault(local_table_name(self._configs[s.table].name, s.shard_index), []).append(s.name)
        if not features:
            return None
        configs = {}
        for s in slots:
            c = self._configs[s.table]
            name = local_table_name(c.name, s.shard_index)
            configs.setdefault(
                name,
                EmbeddingBagConfig(
                    num_embeddings=s.shard.num_rows,
                    embedding_dim=s.shard.num_cols,
                    name=name,
                    feature_names=features[name],
                    # A row-split table's means are taken after its shards' sums are joined.
                    pooling=PoolingType.SUM if self._row_split(c.name) else c.pooling,
                    data_type=c.data_type,
                    weight_init_min=c.weight_init_min,
                    weight_init_max=c.weight_init_max,
                ),
            )
        return EmbeddingBagCollection(
            list(configs.values()), is_weighted=self._is_weighted, device=self._device, optimizer=self._optimizer
        )

    def _column_block_groups(self, configs, sharding_group_ranks: List[List[int]]) -> Dict[str, "dist.ProcessGroup"]:
        """Per column-sharded table, the process group of its blocks' ranks
        (in this rank's sharding group). Every rank creates every such group,
        in the same order, as ``new_group`` requires."""
        groups = {}
        for c in configs:
            sharding = self.plan.tables[c.name]
            if sharding.sharding_type != "column_wise":
                continue
            for ranks in sharding_group_ranks:
                members = [ranks[s.rank] for s in sharding.shards]
                group = dist.new_group(ranks=sorted(members))
                if dist.get_rank() in members:
                    groups[c.name] = group
        return groups

    # -- state ----------------------------------------------------------------

    @torch.no_grad()
    def _initialise(self, source: Optional[EmbeddingBagCollection]) -> None:
        """Shards from ``source`` when given (and not on the meta device),
        else the fresh uniform init; replicas then start equal."""
        if source is not None and source.embedding_bags[self._configs[0].name].weight.device.type != "meta":
            source_weights = {c.name: bag.weight for c, bag in zip(source.embedding_bag_configs(), source.embedding_bags.values())}
            source_state = source.optimizer_state() if source.optimizer is not None else {}
            for local in self.local_shards():
                full = source_weights[local.table]
                local.weight.copy_(full[local.shard.row_offset : local.shard.row_end, local.shard.col_offset : local.shard.col_end])
                for name, tensor in local.state.items():
                    if name in source_state.get(local.table, {}):
                        tensor.copy_(source_state[local.table][name][local.shard.row_offset : local.shard.row_end])
            if self.data_parallel is not None:
                for c, bag in zip(self.data_parallel.embedding_bag_configs(), self.data_parallel.embedding_bags.values()):
                    bag.weight.copy_(source_weights[c.name])
                    for name, tensor in self.data_parallel.optimizer_state()[c.name].items():
                        if name in source_state.get(c.name, {}):
                            tensor.copy_(source_state[c.name][name])
        # Replicas of a shard start equal; data-parallel copies too.
        if self._replica_group is not None and dist.get_world_size(self._replica_group) > 1:
            first = dist.get_process_group_ranks(self._replica_group)[0]
            for tensor in self._local_tensors():
                dist.broadcast(tensor, src=first, group=self._replica_group)
        if self.data_parallel is not None:
            first = dist.get_process_group_ranks(self._dp_group)[0]
            for tensor in list(self.data_parallel.state_dict().values()) + [
                t for s in self.data_parallel.optimizer_state().values() for t in s.values()
            ]:
                dist.broadcast(tensor, src=first, group=self._dp_group)

    def _local_tensors(self) -> List[torch.Tensor]:
        out = []
        for local in self.local_shards():
            out.append(local.weight)
            out.extend(local.state.values())
        return out

    def local_shards(self) -> List[LocalShard]:
        """The shards of model-parallel tables this rank holds (live tensors)."""
        out = []
        for collection in (self.local, self.local_columns):
            if collection is None:
                continue
            states = collection.optimizer_state()
            for name, bag in collection.embedding_bags.items():
                table, k = name.rsplit("@", 1)
                out.append(LocalShard(table, self._shards[table][int(k)], bag.weight, states.get(name, {})))
        return out

    def data_parallel_tables(self) -> List[LocalShard]:
        """The data-parallel tables (a full copy on every rank) as whole-table shards."""
        if self.data_parallel is None:
            return []
        states = self.data_parallel.optimizer_state()
        return [
            LocalShard(c.name, Shard(-1, 0, c.num_embeddings, 0, c.embedding_dim), bag.weight, states[c.name])
            for c, bag in zip(self.data_parallel.embedding_bag_configs(), self.data_parallel.embedding_bags.values())
        ]

    @torch.no_grad()
    def gather_unsharded(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, torch.Tensor]]]:
        """The tables as the unsharded collection would hold them:
        ``(state_dict, optimizer_state)`` with keys ``embedding_bags.<table>.weight``
        and ``{table: {state: tensor}}``. A collective over the sharding
        group; every rank gets full copies, so it is for tests, exports and
        small models."""
        weights, states = {}, {}
        for c in self._configs:
            weights[c.name] = torch.zeros(c.num_embeddings, c.embedding_dim, dtype=torch.float32, device=self._device)
            states[c.name] = {n: torch.zeros(c.num_embeddings, device=self._device) for n in self._optimizer.state_names}
        for local in self.local_shards():
            s = local.shard
            weights[local.table][s.row_offset : s.row_end, s.col_offset : s.col_end] = local.weight
            if s.col_offset == 0:  # column blocks of a row share its state: count it once
                for name, tensor in local.state.items():
                    states[local.table][name][s.row_offset : s.row_end] = tensor
        for c in self._configs:
            if c.name in self._shards:
                dist.all_reduce(weights[c.name], group=self._group)
                for tensor in states[c.name].values():
                    dist.all_reduce(tensor, group=self._group)
        for local in self.data_parallel_tables():
            weights[local.table].copy_(local.weight)
            for name, tensor in local.state.items():
                states[local.table][name].copy_(tensor)
        dtypes = {c.name: c.dtype for c in self._configs}
        state_dict = {f"embedding_bags.{name}.weight": w.to(dtypes[name]) for name, w in weights.items()}
        return state_dict, states

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def optimizer(self) -> FusedOptimizer:
        return self._optimizer

    @property
    def sharding_group(self):
        return self._group

    @property
    def replica_group(self):
        return self._replica_group

    @property
    def device(self) -> torch.device:
        return self._device

    @torch.no_grad()
    def sync_replicas(self) -> None:
        """Agrees the replicas of every shard over the replica group (2D):
        momentum-scaled row-wise AdaGrad folds its increments in (see
        ``MomentumScaledRowWiseAdagrad.sync``); other optimizers average the
        rows and their state. With one replica only the momentum-scaled fold
        runs."""
        replicas = 1 if self._replica_group is None else dist.get_world_size(self._replica_group)
        if isinstance(self._optimizer, MomentumScaledRowWiseAdagrad):
            group = self._replica_group if replicas > 1 else None
            for collection in (self.local, self.local_columns, self.data_parallel):
                if collection is None:
                    continue
                # Data-parallel tables are already equal everywhere: fold only.
                collection.sync(group if collection is not self.data_parallel else None)
            if group is not None:  # the fold all-reduces each local weight and increment (float32 on the wire)
                wire = sum(4 * (local.weight.numel() + local.state["momentum1_increment"].numel()) for local in self.local_shards())
                COMM_STATS.record("replica_sync", 2 * (replicas - 1) * wire // replicas)
            return
        if replicas > 1:
            all_reduce_mean_(self._local_tensors(), self._replica_group, "replica_sync")

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
        state = self._take_prefetched(features)
        if state is None:
            state = self._start_input_dist(features, background=False) if self._shards else self._local_input(features)
        received, box = None, None
        if self._shards:
            if not state.ids_started:
                self._exchange_ids(state)
            self._finish_input_dist(state)
            received, box = self._lookup_and_send(state)
        batch, weights = state.batch, state.weights
        lengths_by_feature = state.lengths
        by_name = {k: i for i, k in enumerate(state.keys)}
        dp_pooled = self._data_parallel_lookup(state.keys, lengths_by_feature, state.values, weights)
        mean_counts = {
            f: lengths_by_feature[by_name[self._feature_names[f]]].clamp(min=1) for f in self._mean_features
        }

        joined_once: List[torch.Tensor] = []

        def joined() -> torch.Tensor:
            # The rows were sent before the caller's dense layers ran; the
            # node made here (after them) runs early in the backward.
            if not joined_once:
                joined_once.append(finish_output_dist(received, box))
            return joined_once[0]

        def blocks() -> Optional[FeatureBlocks]:
            if received is None or self._block_layout is None:
                return None
            return FeatureBlocks(list(self._feature_names), joined(), list(self._widths), *self._block_layout)

        def assemble() -> torch.Tensor:
            if received is not None and self._row_sums:
                # Row-wise everywhere: one add per extra rank, in rank order
                # as the general path sums each feature's row shards.
                blocks = torch.split(joined(), [batch * w for w in self._widths])
                total = blocks[0].view(batch, self._widths[0])
                for block, width in zip(blocks[1:], self._widths[1:]):
                    total = total + block.view(batch, width)
                return self._divide_means(total, mean_counts) if mean_counts else total
            pieces: List[torch.Tensor] = []
            if received is not None:
                blocks = torch.split(joined(), [batch * w for w in self._widths])
                for block, width, slot_widths in zip(blocks, self._widths, self._slot_widths):
                    pieces.extend(torch.split(block.view(batch, width), slot_widths, dim=1))
            if dp_pooled is not None:
                pieces.extend(torch.split(dp_pooled, self._dp_feature_dims, dim=1))
            columns = []
            for f, groups in enumerate(self._assembly):
                for group in groups:
                    column = pieces[group[0]]
                    for other in group[1:]:  # row shards: partial sums
                        column = column + pieces[other]
                    if f in mean_counts:
                        column = column / mean_counts[f].to(column.dtype)[:, None]
                    columns.append(column)
            return torch.cat(columns, dim=1)

        return _PendingKeyedTensor(self._feature_names, self._feature_dims, assemble, blocks)

    def _divide_means(self, total: torch.Tensor, mean_counts: Dict[int, torch.Tensor]) -> torch.Tensor:
        """The summed ``[B, width]`` output with each mean-pooled feature's
        columns divided by its bag sizes: one division for all features,
        where one per feature cost a small op each way."""
        batch, dims = total.shape[0], self._feature_dims
        per_feature = torch.ones(batch, len(dims), dtype=total.dtype, device=total.device)
        for f, counts in mean_counts.items():
            per_feature[:, f] = counts
        if len(set(dims)) == 1:  # equal widths: broadcast over [B, F, D]
            return (total.view(batch, len(dims), dims[0]) / per_feature[:, :, None]).view(batch, -1)
        return total / per_feature.repeat_interleave(torch.tensor(dims, device=total.device), dim=1)

    # -- input dist, in stages (a train pipeline runs them a step ahead) -------

    def start_input_dist(self, features) -> None:
        """Starts sending ``features``' ids to their shards (first stage:
        routing and the counts all-to-all, in the background). The matching
        ``forward(features)`` -- the same object -- picks them up. A
        collective: every rank of the group calls it, in the same order as
        its other collectives. Bad input is reported by that ``forward``,
        on every rank, not here. A no-op for a collection without
        model-parallel tables."""
        if not self._shards:
            return
        self._prefetched.append(self._start_input_dist(features))

    def continue_input_dist(self) -> None:
        """Second stage for every started batch: waits for its counts and
        starts the all-to-all of its lengths and ids (in the background).
        Call it after the forward of the current batch, before its backward,
        so that the ids travel while the backward computes."""
        for state in self._prefetched:
            if not state.ids_started:
                self._exchange_ids(state)

    def _take_prefetched(self, features) -> Optional["_InputDist"]:
        for i, state in enumerate(self._prefetched):
            if state.features is features:
                if i != 0:
                    raise RuntimeError(
                        "ShardedEmbeddingBagCollection: batches whose input dist was started must be looked up "
                        "in the order they were started."
                    )
                return self._prefetched.pop(0)
        if self._prefetched:
            raise RuntimeError(
                "ShardedEmbeddingBagCollection: forward got a batch other than the one whose input dist was "
                "started (start_input_dist); every rank must look up the batches it started, in order."
            )
        return None

    def _start_input_dist(self, features, background: bool = True) -> "_InputDist":
        """Validates and routes this rank's batch, starts the counts
        all-to-all ``(batch, ids, refused)`` per destination. Bad input sends
        the refusal flag instead (so that no rank waits) and is raised later,
        by ``_finish_input_dist``."""
        keys = list(features.keys())
        state = _InputDist(features=features, keys=keys)
        state.error = self._validate(keys, features)
        size = self._group_size
        if state.error is not None:
            counts = torch.tensor([0, 0, 1] * size, dtype=torch.int64, device=self._device)
        else:
            state.batch = features.stride()
            state.lengths = features.lengths().to(torch.int64).view(len(keys), state.batch)
            state.values = features.values().to(torch.int64)
            state.weights = features.weights_or_none() if self._is_weighted else None
            state.routed = self._router(keys).route(state.lengths, state.values, state.weights)
            counts = torch.tensor(
                [[state.batch, n, 0] for n in state.routed.ids_per_rank], dtype=torch.int64, device=self._device
            ).reshape(-1)
        pending: Optional[List] = [] if background else None
        state.received_counts = all_to_all(counts, [3] * size, [3] * size, self._group, "input_dist", pending)
        state.works = pending or []
        state.background = background
        return state

    def _exchange_ids(self, state: "_InputDist") -> None:
        """Waits for the counts; unless a rank refused, starts the all-to-all
        of bag lengths and ids (and one of per-id weights)."""
        for work in state.works:
            work.wait()
        state.works, state.ids_started = [], True
        received_counts = state.received_counts.view(self._group_size, 3)
        refused = (received_counts[:, 2] != 0).nonzero()
        if state.error is not None or refused.numel() > 0:
            state.refused_by = int(refused[0]) if refused.numel() > 0 else None
            return
        routed, slots = state.routed, len(self._my_slots)
        state.batch_sizes = received_counts[:, 0].tolist()
        received_ids = received_counts[:, 1].tolist()
        payload_sizes = [len(s) * state.batch + n for s, n in zip(self._slots_by_rank, routed.ids_per_rank)]
        state.receive_sizes = [slots * b + n for b, n in zip(state.batch_sizes, received_ids)]
        payload = routed_payload(routed, [len(s) for s in self._slots_by_rank])
        pending: Optional[List] = [] if state.background else None  # the plain loop waits at once
        state.received = all_to_all(payload, payload_sizes, state.receive_sizes, self._group, "input_dist", pending)
        if self._is_weighted:
            state.received_weights = all_to_all(
                routed.weights.to(torch.float32), routed.ids_per_rank, received_ids, self._group, "input_dist", pending
            )
        state.works = pending or []
        state.routed = None  # the payload is on its way; the routed copy is not needed

    def _finish_input_dist(self, state: "_InputDist") -> None:
        """Raises this rank's or another rank's refusal; else waits for the ids."""
        if state.error is not None:
            raise state.error
        if state.refused_by is not None:
            raise RuntimeError(
                f"ShardedEmbeddingBagCollection: rank {state.refused_by} of the sharding group refused its input "
                "(its error says why); this rank stops too."
            )
        for work in state.works:
            work.wait()
        state.works = []

    def _lookup_and_send(self, state: "_InputDist"):
        """Local fused lookup of the received bags, then the output
        all-to-all (started, not waited for): ``(buffer, its box)``."""
        batch_sizes, receive_sizes, my_slots = state.batch_sizes, state.receive_sizes, len(self._my_slots)
        if not self._my_slots:
            pooled = torch.zeros(sum(batch_sizes), 0, device=self._device)
        else:
            rank_lengths, rank_ids = [], []
            for q, part in enumerate(torch.split(state.received, receive_sizes)):
                bags = my_slots * batch_sizes[q]
                rank_lengths.append(part[:bags].view(my_slots, batch_sizes[q]))
                rank_ids.append(part[bags:])
            order = feature_major_order(rank_lengths, [t.numel() for t in rank_ids])
            local_values = torch.cat(rank_ids).index_select(0, order)
            local_weights = state.received_weights.index_select(0, order) if self._is_weighted else None
            local_lengths = torch.cat(rank_lengths, dim=1)  # [slots, group batch]
            parts = [
                collection(_slot_input(slots, local_lengths, local_values, local_weights, first)).values()
                for collection, slots, first in self._local_parts()
            ]
            pooled = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # no copy of a lone part
        state.received = state.received_weights = None
        return start_output_dist(pooled, batch_sizes, self._widths, self._group, 1.0 / self._group_size)

    def _data_parallel_lookup(self, keys, lengths_by_feature, values, weights) -> Optional[torch.Tensor]:
        """Pooled ``[B, dims]`` of the data-parallel tables' features, or None."""
        if self.data_parallel is None:
            return None
        per_feature = lengths_by_feature.sum(dim=1).tolist()
        value_slices = torch.split(values, per_feature)
        weight_slices = torch.split(weights, per_feature) if weights is not None else None
        by_name = {k: i for i, k in enumerate(keys)}
        dp_keys = [f for c in self.data_parallel.embedding_bag_configs() for f in c.feature_names]
        idx = [by_name[f] for f in dp_keys]
        dp_input = KeyedJaggedTensor(
            keys=dp_keys,
            values=torch.cat([value_slices[i] for i in idx]),
            lengths=torch.cat([lengths_by_feature[i] for i in idx]),
            weights=torch.cat([weight_slices[i] for i in idx]) if weights is not None else None,
        )
        return self.data_parallel(dp_input).values()

    def _local_input(self, features) -> "_InputDist":
        """The input of a collection of data-parallel tables alone: the ranks
        agree it is good (one tiny all-reduce); no ids move."""
        keys = list(features.keys())
        self._agree_input(self._validate(keys, features))
        state = _InputDist(features=features, keys=keys, batch=features.stride())
        state.lengths = features.lengths().to(torch.int64).view(len(keys), state.batch)
        state.values = features.values().to(torch.int64)
        state.weights = features.weights_or_none() if self._is_weighted else None
        return state

    def _router(self, keys: List[str]) -> Router:
        """The router of this key order (cached): each input feature's slots."""
        router = self._routers.get(tuple(keys))
        if router is None:
            slot_of, row_offsets, bucketed = [], [], []
            for key in keys:
                config = self._configs[self._feature_table[key]]
                shards = self._shards.get(config.name, [])
                slot_of.append([self._slot_index[(key, k)] for k in range(len(shards))])
                row_offsets.append([s.row_offset for s in shards])
                bucketed.append(bool(shards) and SCHEMES[self.plan.tables[config.name].sharding_type].bucketed)
            router = Router(slot_of, row_offsets, bucketed, [len(s) for s in self._slots_by_rank], self._device)
            self._routers[tuple(keys)] = router
        return router

    def _local_parts(self):
        """(collection, its slots, index of its first slot) of the local lookups."""
        parts = []
        n = self._num_regular_slots
        if self.local is not None:
            parts.append((self.local, self._my_slots[:n], 0))
        if self.local_columns is not None:
            parts.append((self.local_columns, self._my_slots[n:], n))
        return parts

    def _validate(self, keys: List[str], features) -> Optional[Exception]:
        """The first problem with this rank's input, or None."""
        try:
            self._check_keys(keys)
            batch = features.stride()
            lengths = features.lengths()
            values = features.values()
            if self._is_weighted and features.weights_or_none() is None:
                raise ValueError("This ShardedEmbeddingBagCollection has is_weighted=True but the input has no weights.")
            if self._is_weighted and features.weights_or_none().requires_grad:
                raise ValueError(
                    "Per-id weights that require grad are not supported by sharded tables yet "
                    "(their gradient would not flow back through the all-to-all); detach them."
                )
            if lengths.numel() != len(keys) * batch:
                raise ValueError(
                    f"Invalid lengths count {lengths.numel()} for {len(keys)} features {keys}. "
                    "Must be number of features x batch size."
                )
            if values.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"Invalid values dtype {values.dtype}. Must be torch.int32 or torch.int64.")
            lengths = lengths.to(torch.int64)
            if bool((lengths < 0).any()):
                bag = int((lengths < 0).nonzero()[0])
                f, b = divmod(bag, batch)
                raise ValueError(
                    f"Invalid length {int(lengths[bag])} for feature {keys[f]!r}, sample {b}: lengths must be >= 0."
                )
            per_feature = lengths.view(len(keys), batch).sum(dim=1)
            if int(per_feature.sum()) != values.numel():
                raise ValueError(f"The lengths add up to {int(per_feature.sum())} ids but there are {values.numel()} values.")
            self._check_ids(keys, values, per_feature)
        except (ValueError, TypeError, IndexError) as error:
            return error
        return None

    def _agree_input(self, error: Optional[Exception]) -> None:
        """Every rank of the group learns whether any rank's input was bad
        (one tiny all-reduce), so that all stop together."""
        group = self._group if self._shards else self._dp_group
        flag = torch.tensor([0 if error is None else dist.get_rank(group) + 1], dtype=torch.int64, device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if error is not None:
            raise error
        if int(flag) > 0:
            raise RuntimeError(
                f"ShardedEmbeddingBagCollection: rank {int(flag) - 1} of the sharding group refused its input "
                "(its error says why); this rank stops too."
            )

    def _check_keys(self, keys: List[str]) -> None:
        check_feature_keys(keys, self._feature_names, self._configs, "ShardedEmbeddingBagCollection")

    def _check_ids(self, keys: List[str], values: torch.Tensor, per_feature: torch.Tensor) -> None:
        """Ids outside their table are refused here, on the rank that owns
        the sample, naming the feature, table and id (a row-wise shard would
        only see a misrouted id)."""
        if values.numel() == 0:
            return
        limits = self._row_limits.get(tuple(keys))
        if limits is None:
            limits = torch.tensor(
                [self._configs[self._feature_table[k]].num_embeddings for k in keys], dtype=torch.int64, device=values.device
            )
            self._row_limits[tuple(keys)] = limits
        # One vectorised pass over all ids against their feature's limit, one
        # sync; the per-feature search runs only on failure.
        per_id_limit = limits.repeat_interleave(per_feature, output_size=values.numel())
        bad = (values < 0) | (values >= per_id_limit)
        if bool(bad.any()):
            position = int(bad.nonzero()[0])
            f = int(torch.searchsorted(per_feature.cumsum(0), torch.tensor(position), right=True))
            value = int(values[position])
            config = self._configs[self._feature_table[keys[f]]]
            raise IndexError(
                f"ShardedEmbeddingBagCollection: id {value} of feature {keys[f]!r} is out of range for "
                f"table {config.name!r} with {config.num_embeddings} rows (valid ids: 0..{config.num_embeddings - 1})."
            )


def _slot_input(slots, lengths: torch.Tensor, values: torch.Tensor, weights, first: int) -> KeyedJaggedTensor:
    """The ``KeyedJaggedTensor`` of slots ``first .. first + len(slots)`` of
    the joined local input (feature-major, lengths ``[slots, batch]``)."""
    per_slot = lengths.sum(dim=1)
    start = int(per_slot[:first].sum())
    end = start + int(per_slot[first : first + len(slots)].sum())
    return KeyedJaggedTensor(
        keys=[s.name for s in slots],
        values=values[start:end],
        lengths=lengths[first : first + len(slots)].reshape(-1),
        weights=weights[start:end] if weights is not None else None,
    )


class _PendingKeyedTensor(KeyedTensor):
    """The output of a sharded lookup whose pooled rows are still on their
    way back: ``values()`` waits for them (once) and assembles the columns.
    Whatever the caller computes before asking overlaps the all-to-all.
    ``feature_blocks()`` waits likewise but hands over the received buffer
    unassembled (``FeatureBlocks``), where the layout allows, else None."""

    def __init__(self, keys, length_per_key, assemble, blocks) -> None:
        super().__init__(keys, length_per_key, None)
        self._assemble = assemble
        self._blocks = blocks

    def feature_blocks(self) -> Optional[FeatureBlocks]:
        return self._blocks()

    def values(self) -> torch.Tensor:
        if self._values is None:
            self._values = self._assemble()
            self._assemble = None
        return self._values

    def __getitem__(self, key: str) -> torch.Tensor:
        self.values()
        return super().__getitem__(key)
