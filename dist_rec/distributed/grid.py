"""The 2D process grid: sharding groups x replica groups, as plain ranks.

A world of T = L x G ranks is cut into G sharding groups of L ranks. Each
sharding group holds one full copy of the sharded tables (its all-to-alls
stay inside it) and serves 1/G of the global batch; the G ranks holding
the same shard form a replica group, over which replicas are synchronised.
With G = 1 this is ordinary model parallelism over all ranks.

Two layouts place the groups on hosts (hosts hold consecutive ranks):
``shards_on_host`` makes a sharding group consecutive ranks, so the
all-to-alls of every step stay on a host's fast links and only replica
sync crosses hosts; ``replicas_on_host`` makes a replica group consecutive
ranks, the other way round.

The grid is data only; the process groups that realise it belong to
``dist_rec.distributed.ProcessGroups``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

LAYOUTS = ("shards_on_host", "replicas_on_host")


@dataclass(frozen=True)
class ShardingGrid:
    """The grid's ranks, and where ``rank`` sits in it."""

    world_size: int
    replicas: int  # G
    layout: str
    rank: int
    sharding_groups: Tuple[Tuple[int, ...], ...]  # global ranks of every sharding group
    replica_groups: Tuple[Tuple[int, ...], ...]  # global ranks of every replica group

    @classmethod
    def build(cls, world_size: int, replicas: int, layout: str, rank: int) -> "ShardingGrid":
        sharding, replica = grid_ranks(world_size, replicas, layout)
        return cls(world_size, replicas, layout, rank, tuple(map(tuple, sharding)), tuple(map(tuple, replica)))

    @property
    def group_size(self) -> int:
        """L: ranks per sharding group."""
        return self.world_size // self.replicas

    @property
    def my_sharding_group(self) -> Tuple[int, ...]:
        return next(g for g in self.sharding_groups if self.rank in g)

    @property
    def my_replica_group(self) -> Tuple[int, ...]:
        return next(g for g in self.replica_groups if self.rank in g)

    @property
    def replica_index(self) -> int:
        """Which sharding group (replica) this rank belongs to: 0 .. G - 1."""
        return next(i for i, g in enumerate(self.sharding_groups) if self.rank in g)

    def __str__(self) -> str:
        groups = [list(g) for g in self.sharding_groups]
        return (
            f"{self.world_size} ranks = {self.group_size} (sharding group) x {self.replicas} (replicas), {self.layout}: "
            f"sharding groups {groups}"
        )


def grid_ranks(world_size: int, replicas: int, layout: str = "shards_on_host") -> Tuple[List[List[int]], List[List[int]]]:
    """(sharding groups, replica groups) as lists of global ranks."""
    if replicas < 1 or world_size % replicas != 0:
        raise ValueError(f"Invalid replicas={replicas}. Must be >= 1 and divide the world size {world_size}.")
    if layout not in LAYOUTS:
        raise ValueError(f"Invalid layout={layout!r}. Must be one of {', '.join(LAYOUTS)}.")
    size = world_size // replicas
    if layout == "shards_on_host":
        sharding = [[g * size + l for l in range(size)] for g in range(replicas)]
    else:
        sharding = [[l * replicas + g for l in range(size)] for g in range(replicas)]
    replica = [[sharding[g][l] for g in range(replicas)] for l in range(size)]
    return sharding, replica
