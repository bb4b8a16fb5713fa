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

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dist_rec.modules.embedding_configs import EmbeddingBagConfig, PoolingType, as_embedding_bag_config
from dist_rec.modules.embedding_modules import EmbeddingBagCollection, _check_configs
from dist_rec.optim.fused import FusedOptimizer, MomentumScaledRowWiseAdagrad
from dist_rec.sharding.column_wise import ColumnBlockUpdate, ColumnWise
from dist_rec.sharding.comm import COMM_STATS, PooledAllToAll, all_reduce_mean_, all_to_all, feature_major_order
from dist_rec.sharding.dp_sharding import DataParallelUpdateExchange
from dist_rec.sharding.plan import Shard, ShardingPlan
from dist_rec.sharding.row_wise import RowWise
from dist_rec.sharding.scheme import ShardingScheme
from dist_rec.sharding.table_row_wise import TableRowWise
from dist_rec.sharding.table_wise import TableWise
from dist_rec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

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
        feature_column: Dict[str, int] = {}
        column = 0
        for t, c in enumerate(configs):
            for f in c.feature_names:
                self._feature_names.append(f)
                self._feature_dims.append(c.embedding_dim)
                self._feature_table[f] = t
                feature_column[f] = column
                column += c.embedding_dim
        self._output_width = column

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

        # Where each received column lands in the output.
        targets = []
        for slots in self._slots_by_rank:
            for s in slots:
                base = feature_column[s.feature] + s.shard.col_offset
                targets.extend(range(base, base + s.shard.num_cols))
        if self.data_parallel is not None:
            for c in dp_configs:
                for f in c.feature_names:
                    targets.extend(range(feature_column[f], feature_column[f] + c.embedding_dim))
        self.register_buffer("_output_index", torch.tensor(targets, dtype=torch.int64, device=self._device), persistent=False)
        self._mean_features = [
            f for f in self._feature_names
            if configs[self._feature_table[f]].pooling == PoolingType.MEAN
            and plan.tables[configs[self._feature_table[f]].name].sharding_type != "data_parallel"
        ]
        self._feature_column = feature_column
        self._row_limits: Dict[Tuple[str, ...], torch.Tensor] = {}

        self._initialise(source)

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
                    pooling=PoolingType.SUM,  # means are taken after the shards' sums are joined
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
        (the others are told which rank), never a hang."""
        keys = list(features.keys())
        error = self._validate(keys, features)
        self._agree_input(error)
        batch = features.stride()
        lengths = features.lengths().to(torch.int64)
        values = features.values()
        weights = features.weights_or_none() if self._is_weighted else None
        per_feature = lengths.view(len(keys), batch).sum(dim=1)
        value_slices = torch.split(values.to(torch.int64), per_feature.tolist())
        weight_slices = torch.split(weights, per_feature.tolist()) if weights is not None else [None] * len(keys)
        lengths_by_feature = lengths.view(len(keys), batch)
        by_name = {k: i for i, k in enumerate(keys)}

        pooled_parts = []
        if self._shards:
            pooled_parts.append(self._model_parallel(by_name, lengths_by_feature, value_slices, weight_slices, batch))
        if self.data_parallel is not None:
            dp_keys = [f for c in self.data_parallel.embedding_bag_configs() for f in c.feature_names]
            idx = [by_name[f] for f in dp_keys]
            dp_input = KeyedJaggedTensor(
                keys=dp_keys,
                values=torch.cat([value_slices[i] for i in idx]),
                lengths=torch.cat([lengths_by_feature[i] for i in idx]),
                weights=torch.cat([weight_slices[i] for i in idx]) if weights is not None else None,
            )
            pooled_parts.append(self.data_parallel(dp_input).values())
        joined = pooled_parts[0] if len(pooled_parts) == 1 else torch.cat(pooled_parts, dim=1)
        out = joined.new_zeros(batch, self._output_width).index_add(1, self._output_index, joined)
        if self._mean_features:
            divisor = torch.ones(batch, self._output_width, dtype=out.dtype, device=out.device)
            for f in self._mean_features:
                start = self._feature_column[f]
                count = lengths_by_feature[by_name[f]].clamp(min=1).to(out.dtype)
                divisor[:, start : start + self._configs[self._feature_table[f]].embedding_dim] = count[:, None]
            out = out / divisor
        return KeyedTensor(self._feature_names, self._feature_dims, out)

    def _model_parallel(self, by_name, lengths_by_feature, value_slices, weight_slices, batch) -> torch.Tensor:
        """Input all-to-all, local fused lookup, output all-to-all."""
        size, weighted = self._group_size, self._is_weighted
        # Route every feature to the shards of its table, grouped by destination.
        routed: Dict[Tuple[str, int], tuple] = {}
        for c in self._configs:
            shards = self._shards.get(c.name)
            if shards is None:
                continue
            scheme = SCHEMES[self.plan.tables[c.name].sharding_type]
            for f in c.feature_names:
                i = by_name[f]
                for k, part in enumerate(scheme.route(shards, lengths_by_feature[i], value_slices[i], weight_slices[i])):
                    routed[(f, k)] = part
        send_lengths, send_ids, send_weights, id_counts = [], [], [], []
        for slots in self._slots_by_rank:
            parts = [routed[(s.feature, s.shard_index)] for s in slots]
            send_lengths.extend(p[0] for p in parts)
            send_ids.extend(p[1] for p in parts)
            if weighted:
                send_weights.extend(p[2] for p in parts)
            id_counts.append(sum(p[1].numel() for p in parts))
        device = lengths_by_feature.device
        counts = torch.tensor([[batch, n] for n in id_counts], dtype=torch.int64, device=device).reshape(-1)
        received_counts = all_to_all(counts, [2] * size, [2] * size, self._group, "input_dist").view(size, 2)
        batch_sizes = received_counts[:, 0].tolist()
        my_slots = len(self._my_slots)
        payload_sizes = [len(slots) * batch + n for slots, n in zip(self._slots_by_rank, id_counts)]
        receive_sizes = [my_slots * b + int(n) for b, n in zip(batch_sizes, received_counts[:, 1].tolist())]

        # Per destination: the slots' lengths, then their ids.
        chunks, start_l, start_i = [], 0, 0
        for r, slots in enumerate(self._slots_by_rank):
            n = len(slots)
            chunks.extend(send_lengths[start_l : start_l + n])
            chunks.extend(send_ids[start_i : start_i + n])
            start_l += n
            start_i += n
        payload = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64, device=device)
        received = all_to_all(payload, payload_sizes, receive_sizes, self._group, "input_dist")
        received_weights = None
        if weighted:
            weight_payload = torch.cat(send_weights) if send_weights else torch.zeros(0, device=device)
            received_weights = all_to_all(
                weight_payload.to(torch.float32), id_counts, received_counts[:, 1].tolist(), self._group, "input_dist"
            )

        if not self._my_slots:
            pooled = torch.zeros(sum(batch_sizes), 0, device=device)
        else:
            rank_lengths, rank_ids = [], []
            for q, part in enumerate(torch.split(received, receive_sizes)):
                bags = my_slots * batch_sizes[q]
                rank_lengths.append(part[:bags].view(my_slots, batch_sizes[q]))
                rank_ids.append(part[bags:])
            order = feature_major_order(rank_lengths, [t.numel() for t in rank_ids])
            local_values = torch.cat(rank_ids)[order]
            local_weights = received_weights[order] if weighted else None
            local_lengths = torch.cat(rank_lengths, dim=1)  # [slots, group batch]
            pooled = torch.cat(
                [
                    collection(_slot_input(slots, local_lengths, local_values, local_weights, first)).values()
                    for collection, slots, first in self._local_parts()
                ],
                dim=1,
            )
        return PooledAllToAll.apply(pooled, batch_sizes, self._widths, self._group, 1.0 / size)

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
        unknown = [k for k in keys if k not in self._feature_table]
        if unknown:
            raise ValueError(
                f"Unknown feature names {unknown} in the input. This collection has features {self._feature_names} "
                f"(tables {[c.name for c in self._configs]})."
            )
        missing = [f for f in self._feature_names if f not in keys]
        if missing:
            raise ValueError(f"The input lacks features {missing}; it has keys {keys}.")

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
        limit = torch.repeat_interleave(limits, per_feature, output_size=values.numel())
        bad = (values < 0) | (values >= limit)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            f = int(torch.searchsorted(torch.cumsum(per_feature, 0), torch.tensor(i), right=True))
            config = self._configs[self._feature_table[keys[f]]]
            raise IndexError(
                f"ShardedEmbeddingBagCollection: id {int(values[i])} of feature {keys[f]!r} is out of range for "
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
