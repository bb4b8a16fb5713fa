"""2D embedding replicas averaged in the background (ShadowSync's rounds
applied to the sharded tables).

Under 2D sparse parallelism every shard has one copy per replica group,
each trained on its group's samples. ``EmbeddingReplicaSync`` averages the
copies of this rank's shards (weights and row-wise state) with the replicas
holding the same shards, in ShadowSync's background rounds: its own process
group per set of copies, a round's correction ``mean - copy`` added to the
live rows, so the fused updates made during the round stay. The fused
update in the backward holds the round's lock (``LocalLookup.update_lock``),
so a row is never stepped and corrected at once.

Limits, refused by name: in-memory storages only (a round reads and adds
in place), and plain row-wise optimizers (momentum-scaled row-wise AdaGrad
folds per-replica increments at a sync, which a background average would
double count). Every round moves every row of the shards; only the rows
touched since the last round would be cheaper.
"""

from __future__ import annotations

from typing import List, Mapping

import torch

from dist_rec.optim.fused import MomentumScaledRowWiseAdagrad
from dist_rec.placement import InMemoryStorage
from dist_rec.sync.rules import ModelAveraging
from dist_rec.sync.shadow import ShadowSync


class EmbeddingReplicaSync:
    """Background averaging of 2D shard replicas.

    Args:
        collections (Mapping[str, ShardedEmbeddingBagCollection]): the
            sharded collections (``DistributedModelParallel.sharded``).
        process_groups (ProcessGroups): with 2 or more replica groups.
        interval_s (float): pause between rounds.
    """

    def __init__(self, collections: Mapping, process_groups, interval_s: float = 0.0) -> None:
        groups = process_groups
        grid = groups.grid
        if grid.replicas < 2:
            raise ValueError(f"Invalid sync.embeddings='background' with {grid.replicas} replica group. Must have "
                             "sharding.replicas >= 2 (2D: there is nothing to average otherwise).")  # fmt: skip
        mine = None
        for index, ranks in enumerate(grid.replica_groups):  # a collective: every rank makes every group, in order
            if groups.subgroup(f"embedding_sync/{index}", ranks=ranks) is not None:
                mine = f"embedding_sync/{index}"
        tensors: List[torch.Tensor] = []
        self.lookups = []
        for path, sharded in collections.items():
            if isinstance(sharded._optimizer, MomentumScaledRowWiseAdagrad):
                raise ValueError(f"Invalid sync.embeddings='background' for {path!r}: momentum-scaled row-wise AdaGrad "
                                 "folds per-replica increments at a sync; use sync.embeddings='every_n'.")  # fmt: skip
            for lookup in sharded._lookups:
                if not isinstance(lookup.storage, InMemoryStorage):
                    raise ValueError(f"Invalid sync.embeddings='background' for tables {lookup.tables()}: their storage "
                                     f"is {type(lookup.storage).__name__}; background rounds need rows in memory.")  # fmt: skip
                self.lookups.append(lookup)
            for local in sharded.local_shards():
                weight, state = local.read()  # views of the in-memory rows
                tensors += [weight, *[state[name] for name in sorted(state)]]
        self.sync = ShadowSync(tensors, ModelAveraging(grid.replicas), lambda: groups.group(mine), interval_s=interval_s,
                               kind="embedding_sync")  # fmt: skip
        for lookup in self.lookups:
            lookup.update_lock = self.sync.lock
        self._collections = dict(collections)

    def start(self) -> None:
        self.sync.start()

    def stop(self) -> None:
        """Stops the rounds (agreed) and averages the replicas once in the foreground."""
        self.sync.stop()
        for sharded in self._collections.values():
            sharded.sync_replicas()

    def quiesced(self):
        return self.sync.quiesced()
