"""Input dist: every id of a batch to the ranks whose shards pool it.

``SparseFeaturesDist`` is the input side of every sharding type at once.
A batch's ids are validated on the rank that owns the samples (naming
feature, table and id), routed to their slots by the types' rules (whole
bags, or bucketised by row range: ``router.py``), and sent in one
all-to-all of bag lengths and ids (and one of per-id weights) inside the
sharding group. It runs in stages, so that a train pipeline can start a
batch's dist one step ahead (``pipeline.py``)::

    start          validate, route, all-to-all of the counts (background)
    exchange_ids   counts in; all-to-all of lengths and ids (background)
    finish         wait for the ids; raise any rank's refusal

Bad input on any rank stops every rank with an error (the others are
told which rank refused), never a hang: a refusing rank still takes part
in the counts all-to-all, with a flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from dist_rec.modules.embedding_modules import check_feature_keys, warn_ignored_weights
from dist_rec.ops.embedding_bag import check_finite_per_sample_weights
from dist_rec.ops.id_range import first_id_out_of_range
from dist_rec.sharding.comm import all_to_all
from dist_rec.sharding.router import Routed, Router
from dist_rec.sharding.router import payload as routed_payload
from dist_rec.sharding.schemes import scheme_for
from dist_rec.sharding.slots import SlotLayout
from dist_rec.sparse.jagged_tensor import is_integer_dtype


@dataclass
class InputDistState:
    """One batch's input dist on its way."""

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


class SparseFeaturesDist:
    """The input all-to-all of a sharded collection, in stages.

    Args:
        layout (SlotLayout): every rank's slots.
        process_groups: owner of the sharding group (asked at each call).
        is_weighted (bool): bags carry per-id weights.
        device (torch.device): where ids travel.
        agreement_group (Callable[[], ProcessGroup]): the group over which
            a collection with no model-parallel table agrees its input is good.
    """

    def __init__(self, layout: SlotLayout, process_groups, is_weighted: bool, device: torch.device, agreement_group) -> None:
        self.layout = layout
        self.process_groups = process_groups
        self.is_weighted = is_weighted
        self.device = device
        self._agreement_group = agreement_group
        self._routers: Dict[Tuple[str, ...], Router] = {}
        self._row_limits: Dict[Tuple[str, ...], torch.Tensor] = {}
        self._warned_ignored_weights = False  # weights given to an unweighted collection: warned once
        # The tables' device as tensors report it ("cuda" resolved to its index, as the storages got it).
        resolved = device.index is not None or device.type in ("cpu", "meta")
        self._table_device = device if resolved else torch.empty(0, device=device).device
        self.started: List[InputDistState] = []  # batches whose dist was started ahead, in order

    @property
    def has_shards(self) -> bool:
        return bool(self.layout.shards)

    def _group(self):
        return self.process_groups.sharding_group

    # -- the stages ------------------------------------------------------------

    def start(self, features, background: bool = True) -> InputDistState:
        """Validates and routes this rank's batch, starts the counts
        all-to-all ``(batch, ids, refused)`` per destination. Bad input sends
        the refusal flag instead (so that no rank waits) and is raised later,
        by ``finish``."""
        keys = list(features.keys())
        state = InputDistState(features=features, keys=keys)
        state.error = self.validate(keys, features)
        group = self._group()
        size = dist.get_world_size(group)
        if state.error is not None:
            counts = torch.tensor([0, 0, 1] * size, dtype=torch.int64, device=self.device)
        else:
            self._read(state, features)
            state.routed = self._router(keys).route(state.lengths, state.values, state.weights)
            counts = torch.tensor(
                [[state.batch, n, 0] for n in state.routed.ids_per_rank], dtype=torch.int64, device=self.device
            ).reshape(-1)
        pending: Optional[List] = [] if background else None
        state.received_counts = all_to_all(counts, [3] * size, [3] * size, group, "input_dist", pending)
        state.works = pending or []
        state.background = background
        return state

    def exchange_ids(self, state: InputDistState) -> None:
        """Waits for the counts; unless a rank refused, starts the all-to-all
        of bag lengths and ids (and one of per-id weights)."""
        for work in state.works:
            work.wait()
        state.works, state.ids_started = [], True
        group = self._group()
        received_counts = state.received_counts.view(dist.get_world_size(group), 3)
        refused = (received_counts[:, 2] != 0).nonzero()
        if state.error is not None or refused.numel() > 0:
            state.refused_by = int(refused[0]) if refused.numel() > 0 else None
            return
        slots_by_rank = self.layout.slots_by_rank
        routed, slots = state.routed, len(slots_by_rank[dist.get_rank(group)])
        state.batch_sizes = received_counts[:, 0].tolist()
        received_ids = received_counts[:, 1].tolist()
        payload_sizes = [len(s) * state.batch + n for s, n in zip(slots_by_rank, routed.ids_per_rank)]
        state.receive_sizes = [slots * b + n for b, n in zip(state.batch_sizes, received_ids)]
        payload = routed_payload(routed, [len(s) for s in slots_by_rank])
        pending: Optional[List] = [] if state.background else None  # the plain loop waits at once
        state.received = all_to_all(payload, payload_sizes, state.receive_sizes, group, "input_dist", pending)
        if self.is_weighted:
            state.received_weights = all_to_all(
                routed.weights.to(torch.float32), routed.ids_per_rank, received_ids, group, "input_dist", pending
            )
        state.works = pending or []
        state.routed = None  # the payload is on its way; the routed copy is not needed

    def finish(self, state: InputDistState) -> None:
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

    def local_only(self, features) -> InputDistState:
        """The input of a collection of data-parallel tables alone: the ranks
        agree it is good (one tiny all-reduce); no ids move."""
        keys = list(features.keys())
        self._agree(self.validate(keys, features))
        state = InputDistState(features=features, keys=keys)
        self._read(state, features)
        return state

    def _read(self, state: InputDistState, features) -> None:
        state.batch = features.stride()
        state.lengths = features.lengths().to(torch.int64).view(len(state.keys), state.batch)
        state.values = features.values().to(torch.int64)
        state.weights = features.weights_or_none() if self.is_weighted else None

    # -- batches started ahead (a train pipeline) --------------------------------

    def start_ahead(self, features) -> None:
        self.started.append(self.start(features))

    def continue_started(self) -> None:
        for state in self.started:
            if not state.ids_started:
                self.exchange_ids(state)

    def take_started(self, features, in_order: bool) -> Optional[InputDistState]:
        """The started dist of this very batch, or None. With ``in_order``
        (training) a forward must take the started batches in the order they
        were started; an evaluation forward may run in between (its
        collectives are issued after the started ones on every rank)."""
        for i, state in enumerate(self.started):
            if state.features is features:
                if i != 0:
                    raise RuntimeError(
                        "ShardedEmbeddingBagCollection: batches whose input dist was started must be looked up "
                        "in the order they were started."
                    )
                return self.started.pop(0)
        if self.started and in_order:
            raise RuntimeError(
                "ShardedEmbeddingBagCollection: forward got a batch other than the one whose input dist was "
                "started (start_input_dist); every rank must look up the batches it started, in order."
            )
        return None

    # -- routing and validation --------------------------------------------------

    def _router(self, keys: List[str]) -> Router:
        """The router of this key order (cached): each input feature's slots."""
        router = self._routers.get(tuple(keys))
        if router is None:
            layout = self.layout
            slot_of, row_offsets, bucketed = [], [], []
            for key in keys:
                config = layout.configs[layout.feature_table[key]]
                shards = layout.shards.get(config.name, [])
                slot_of.append([layout.slot_index[(key, k)] for k in range(len(shards))])
                row_offsets.append([s.row_offset for s in shards])
                bucketed.append(bool(shards) and scheme_for(layout.plan.tables[config.name].sharding_type).bucketed)
            router = Router(slot_of, row_offsets, bucketed, [len(s) for s in layout.slots_by_rank], self.device)
            self._routers[tuple(keys)] = router
        return router

    def validate(self, keys: List[str], features) -> Optional[Exception]:
        """The first problem with this rank's input, or None.

        Never raises: whatever goes wrong while checking (also an error type
        no check foresaw) is returned, so that the ranks still agree their
        verdict (``start``'s refusal flag, ``_agree``) and none is left
        waiting in a collective. Weights given to a collection built without
        ``is_weighted`` are ignored, with one warning per collection."""
        try:
            self._validate(keys, features)
        except Exception as error:  # noqa: BLE001 -- every rank must learn of it
            return error
        return None

    def _validate(self, keys: List[str], features) -> None:
        check_feature_keys(keys, self.layout.feature_names, self.layout.configs, "ShardedEmbeddingBagCollection")
        batch = features.stride()
        values = features.values()
        weights = features.weights_or_none()
        if not self.is_weighted:
            if weights is not None and not self._warned_ignored_weights:
                self._warned_ignored_weights = True
                warn_ignored_weights("ShardedEmbeddingBagCollection", self._features_and_tables(keys))
            weights = None
        elif weights is None:
            raise ValueError("This ShardedEmbeddingBagCollection has is_weighted=True but the input has no weights.")
        # Devices and dtypes first (free: no pass over the data), before any
        # tensor is read or anything is cached for this key order.
        given_lengths = features.lengths_or_none() if hasattr(features, "lengths_or_none") else None
        given_offsets = features.offsets_or_none() if hasattr(features, "offsets_or_none") else None
        given = (("values", values), ("lengths", given_lengths), ("offsets", given_offsets), ("weights", weights))
        self._check_tensors(keys, given)
        lengths = features.lengths()
        self._check_tensors(keys, (("lengths", lengths),))
        if weights is not None and weights.requires_grad:
            raise ValueError(
                "Per-id weights that require grad are not supported by sharded tables yet "
                "(their gradient would not flow back through the all-to-all); detach them."
            )
        if lengths.numel() != len(keys) * batch:
            raise ValueError(
                f"Invalid lengths count {lengths.numel()} for {len(keys)} features {keys}. "
                "Must be number of features x batch size."
            )
        if weights is not None and weights.numel() != values.numel():
            raise ValueError(
                f"Invalid weights for {self._features_and_tables(keys)}: {weights.numel()} per-id weights for "
                f"{values.numel()} values. Must be one weight per value."
            )
        lengths = lengths.to(torch.int64)
        if bool((lengths < 0).any()):
            bag = int((lengths < 0).nonzero()[0])
            f, b = divmod(bag, batch)
            raise ValueError(
                f"Invalid length {int(lengths[bag])} for feature {keys[f]!r} (table {self._table_of(keys[f])!r}), "
                f"sample {b}: lengths must be >= 0."
            )
        per_feature = lengths.view(len(keys), batch).sum(dim=1)
        total = int(per_feature.sum())
        if total != values.numel():
            raise self._explain_mismatch(keys, lengths, batch, total, values.numel())
        if weights is not None:
            self._check_finite_weights(keys, weights, lengths)
        self._check_ids(keys, values, per_feature)

    def _table_of(self, key: str) -> str:
        return self.layout.configs[self.layout.feature_table[key]].name

    def _features_and_tables(self, keys: List[str]) -> str:
        """``features [...] (tables [...])``, for messages about a whole input tensor."""
        tables = list(dict.fromkeys(self._table_of(k) for k in keys))
        return f"features {keys} (tables {tables})"

    def _check_tensors(self, keys: List[str], given) -> None:
        """Refuses ids, lengths, offsets or weights on another device than the
        tables (meta ids used to fail uncaught, and leave the row limits of
        this key order cached on the meta device) and non-integer ids,
        lengths or offsets (float lengths used to be truncated silently).
        Only dtypes and devices are read."""
        for name, tensor in given:
            if tensor is not None and tensor.device != self._table_device:
                raise ValueError(
                    f"Invalid {name} device={tensor.device} for {self._features_and_tables(keys)}. "
                    f"Must be {self._table_device}, the device of the tables."
                )
        for name, tensor in given:
            if tensor is None or name == "weights":
                continue
            if name == "values" and tensor.dtype not in (torch.int32, torch.int64):
                raise TypeError(
                    f"Invalid values dtype={tensor.dtype} for {self._features_and_tables(keys)}. "
                    "Must be torch.int32 or torch.int64."
                )
            if name != "values" and not is_integer_dtype(tensor.dtype):
                raise TypeError(
                    f"Invalid {name} dtype={tensor.dtype} for {self._features_and_tables(keys)}. "
                    "Must be an integer dtype (torch.int32 or torch.int64)."
                )

    def _explain_mismatch(
        self, keys: List[str], lengths: torch.Tensor, batch: int, total: int, num_values: int
    ) -> ValueError:
        """Lengths that do not add up to the values, named by feature, table
        and sample as the unsharded collection names them."""
        mismatch = f"the lengths add up to {total} ids but there are {num_values} values"
        if total > num_values:
            # The first bag that runs past the values.
            ends = lengths.cumsum(0)
            bag = int((ends > num_values).nonzero()[0])
            f, b = divmod(bag, batch)
            return ValueError(
                f"Invalid length {int(lengths[bag])} for feature {keys[f]!r} (table {self._table_of(keys[f])!r}), "
                f"sample {b}: its bag ends at {int(ends[bag])}, past the {num_values} values; {mismatch}."
            )
        last = keys[-1]
        return ValueError(
            f"Invalid lengths for feature {last!r} (table {self._table_of(last)!r}), the last one: the bags end at "
            f"{total} but there are {num_values} values; {mismatch}."
        )

    def _check_finite_weights(self, keys: List[str], weights: torch.Tensor, lengths: torch.Tensor) -> None:
        """Refuses NaN or inf per-id weights, naming the value, feature,
        sample and table (``check_finite_per_sample_weights``: one sum over
        the weights; the offsets are built and searched only on failure)."""
        if weights.numel() == 0 or bool(torch.isfinite(weights.sum())):
            return
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        configs, config_index = self.layout.configs, [self.layout.feature_table[k] for k in keys]
        try:
            check_finite_per_sample_weights("ShardedEmbeddingBagCollection", weights, offsets, config_index)
        except ValueError as error:
            message = str(error)
            message = re.sub(r"feature slot (\d+)", lambda m: f"feature {keys[int(m.group(1))]!r}", message)
            message = re.sub(r"table (\d+)", lambda m: f"table {configs[int(m.group(1))].name!r}", message)
            for op_name, kjt_name in (("per_sample_weights", "weights"), ("indices", "values")):
                message = message.replace(op_name, kjt_name)
            raise ValueError(message) from None

    def _agree(self, error: Optional[Exception]) -> None:
        """Every rank of the group learns whether any rank's input was bad
        (one tiny all-reduce), so that all stop together."""
        group = self._group() if self.has_shards else self._agreement_group()
        flag = torch.tensor([0 if error is None else dist.get_rank(group) + 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if error is not None:
            raise error
        if int(flag) > 0:
            raise RuntimeError(
                f"ShardedEmbeddingBagCollection: rank {int(flag) - 1} of the sharding group refused its input "
                "(its error says why); this rank stops too."
            )

    def _check_ids(self, keys: List[str], values: torch.Tensor, per_feature: torch.Tensor) -> None:
        """Ids outside their table are refused here, on the rank that owns
        the sample, naming the feature, table and id (a row-wise shard would
        only see a misrouted id)."""
        if values.numel() == 0:
            return
        layout = self.layout
        limits = self._row_limits.get(tuple(keys))
        if limits is None:
            rows = [layout.configs[layout.feature_table[k]].num_embeddings for k in keys]
            limits = torch.tensor(rows, dtype=torch.int64, device=self._table_device)
            self._row_limits[tuple(keys)] = limits
        # One pass over all ids against their feature's limit (one sync);
        # the per-feature search runs only on failure.
        position = first_id_out_of_range(values, per_feature, limits)
        if position >= 0:
            position_t = torch.tensor(position, device=per_feature.device)
            f = int(torch.searchsorted(per_feature.cumsum(0), position_t, right=True))
            value = int(values[position])
            config = layout.configs[layout.feature_table[keys[f]]]
            raise IndexError(
                f"ShardedEmbeddingBagCollection: id {value} of feature {keys[f]!r} is out of range for "
                f"table {config.name!r} with {config.num_embeddings} rows (valid ids: 0..{config.num_embeddings - 1})."
            )
