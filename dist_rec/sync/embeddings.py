"""2D embedding replicas averaged in the background (ShadowSync's rounds
applied to the sharded tables).

Under 2D sparse parallelism every shard has one copy per replica group,
each trained on its group's samples. ``EmbeddingReplicaSync`` averages the
copies of this rank's shards (weights and row-wise state) with the replicas
holding the same shards, in ShadowSync's background rounds: its own process
group per set of copies (``ProcessGroups.copies_subgroups``, re-formed by a
rebuild), a round's correction ``mean - copy`` added to the live rows, so
the fused updates made during the round stay. The fused update in the
backward holds the round's lock (``LocalLookup.update_lock``), so a row is
never stepped and corrected at once.

Only the rows some replica touched since the last round move
(``TouchedRows``): every fused update marks its rows (a ``RowTracker`` per
lookup, ``LocalLookup.sync_tracker``); a round swaps the marks for fresh
ones, takes their union over the replicas (one all-reduce of a byte per
row), and averages those rows only. Why that loses nothing: the update
and its mark happen under the round's lock, as does the swap, so an update
is either marked before the swap (averaged in this round) or after it
(averaged in the next). A row no replica marked since the last swap was
equal on every replica after the last round, and an update made after a
round's copy is kept by the delta and marked for the next round. The first round
after a start averages every row (the replicas may differ anywhere: a
resume, a recovery).

Limits, refused by name: in-memory storages only (a round reads and adds
in place), and plain row-wise optimizers (momentum-scaled row-wise AdaGrad
folds per-replica increments at a sync, which a background average would
double count).
"""

from __future__ import annotations

from typing import List, Mapping, Optional

import torch
import torch.distributed as dist

from dist_rec.checkpoint.snapshot import RowTracker
from dist_rec.optim.fused import MomentumScaledRowWiseAdagrad
from dist_rec.placement import InMemoryStorage
from dist_rec.sync.rules import ModelAveraging
from dist_rec.sync.shadow import Rounds, ShadowSync


class TouchedRows(Rounds):
    """Rounds over the rows of ``shards`` (``LocalShard``s) that some replica
    touched since the last round (see the module docstring); every row in
    the first round after a ``restart``.

    Args:
        shards: this rank's local shards, in the same order on every replica.
        trackers: the ``RowTracker`` of each shard's storage (by ``id``).
        group: returns the copies' process group.
    """

    def __init__(self, shards, trackers: Mapping[int, RowTracker], group, kind: str = "embedding_sync") -> None:
        self.shards = list(shards)
        self.blocks = [local.read() for local in self.shards]  # (weight, state): views of the in-memory rows
        tensors = [t for weight, state in self.blocks for t in (weight, *(state[n] for n in sorted(state)))]
        super().__init__(tensors, ModelAveraging(1), group, kind)
        self.trackers = trackers
        self.full = True
        self.rows: List[Optional[torch.Tensor]] = [None] * len(self.shards)  # the round's rows per shard (None: all)
        self.rows_moved = 0  # rows averaged over every round (per copy)

    def restart(self) -> None:
        self.full = True

    def rows_per_round(self) -> float:
        """The share of the rows a round moved, on average so far."""
        every_row = sum(local.shard.num_rows for local in self.shards)
        return self.rows_moved / max(1, self.rounds) / max(1, every_row)

    def select(self, group) -> None:
        """Swaps the marks for fresh ones and takes their union over the
        replicas (a collective): the rows this round moves."""
        marks = []
        with self.lock:  # the fused update marks its rows under it: a mark lands wholly before or after the swap
            for local in self.shards:
                tracker = self.trackers[id(local.storage)]
                marks.append(tracker.dirty[local.index])
                tracker.dirty[local.index] = torch.zeros_like(marks[-1])
        if self.full:
            self.full = False
            self.rows = [None] * len(self.shards)
            self.rows_moved += sum(m.numel() for m in marks)
            return
        union = torch.cat(marks).to(torch.uint8) if marks else torch.zeros(0, dtype=torch.uint8)
        dist.all_reduce(union, op=dist.ReduceOp.MAX, group=group)
        self.rows = [part.nonzero().reshape(-1) for part in torch.split(union, [m.numel() for m in marks])]
        self.rows_moved += sum(r.numel() for r in self.rows)

    def _parts(self):
        for (weight, state), rows in zip(self.blocks, self.rows):
            for tensor in (weight, *(state[n] for n in sorted(state))):
                yield tensor, rows

    def copy(self) -> torch.Tensor:
        parts = [(t if rows is None else t.index_select(0, rows)).reshape(-1) for t, rows in self._parts()]
        return torch.cat(parts) if parts else torch.zeros(0)

    def add(self, delta: torch.Tensor) -> None:
        offset = 0
        for tensor, rows in self._parts():
            count = tensor.numel() if rows is None else rows.numel() * (tensor.numel() // max(1, tensor.shape[0]))
            part = delta[offset : offset + count]
            offset += count
            if rows is None:
                tensor.add_(part.view_as(tensor))
            elif rows.numel():
                tensor.index_add_(0, rows, part.view(rows.numel(), *tensor.shape[1:]))


class EmbeddingReplicaSync:
    """Background averaging of 2D shard replicas.

    Args:
        collections (Mapping[str, ShardedEmbeddingBagCollection]): the
            sharded collections (``DistributedModelParallel.sharded``).
        process_groups (ProcessGroups): with 2 or more replica groups.
        interval_s (float): least pause between rounds.
        duty (float): the largest share of time spent in rounds.
    """

    def __init__(self, collections: Mapping, process_groups, interval_s: float = 0.0, duty: float = 1.0) -> None:
        groups = process_groups
        if groups.grid.replicas < 2:
            raise ValueError(f"Invalid sync.embeddings='background' with {groups.grid.replicas} replica group. Must have "
                             "sharding.replicas >= 2 (2D: there is nothing to average otherwise).")  # fmt: skip
        groups.copies_subgroups("embedding_sync")  # a collective: every rank makes every group, in order
        shards, trackers = [], {}
        self.lookups = []
        for path, sharded in collections.items():
            if isinstance(sharded._optimizer, MomentumScaledRowWiseAdagrad):
                raise ValueError(f"Invalid sync.embeddings='background' for {path!r}: momentum-scaled row-wise AdaGrad "
                                 "folds per-replica increments at a sync; use sync.embeddings='every_n'.")  # fmt: skip
            for lookup in sharded._lookups:
                if not isinstance(lookup.storage, InMemoryStorage):
                    raise ValueError(f"Invalid sync.embeddings='background' for tables {lookup.tables()}: their storage "
                                     f"is {type(lookup.storage).__name__}; background rounds need rows in memory.")  # fmt: skip
                lookup.sync_tracker = trackers[id(lookup.storage)] = RowTracker(lookup.storage)
                self.lookups.append(lookup)
            shards += sharded.local_shards()
        self._groups = groups
        self.rows = TouchedRows(shards, trackers, lambda: groups.copies_subgroup("embedding_sync"))
        self.sync = ShadowSync(self.rows, None, None, interval_s=interval_s, duty=duty)
        for lookup in self.lookups:
            lookup.update_lock = self.sync.lock
        self._collections = dict(collections)

    def start(self) -> None:
        """Starts (or, after a rebuild, restarts) the rounds: the first
        averages every row; the mean is over the copies there are now."""
        group = self._groups.copies_subgroup("embedding_sync")
        self.sync.start(rule=ModelAveraging(dist.get_world_size(group)))

    def stop(self) -> None:
        """Stops the rounds (agreed) and averages the replicas once in the foreground."""
        self.sync.stop()
        for sharded in self._collections.values():
            sharded.sync_replicas()

    def abandon(self, timeout_s: float = 10.0) -> bool:
        """After a failure: the rounds end, nothing more is averaged (``ShadowSync.abandon``)."""
        return self.sync.abandon(timeout_s)

    def quiesced(self):
        return self.sync.quiesced()
