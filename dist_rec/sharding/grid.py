"""The 2D process grid: sharding groups x replica groups.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch.distributed as dist

LAYOUTS = ("shards_on_host", "replicas_on_host")


@dataclass
class ShardingGrid:
    """This rank's place in the grid, and its process groups."""

    world_size: int
    replicas: int  # G
    layout: str
    sharding_groups: List[List[int]]  # global ranks of every sharding group
    replica_groups: List[List[int]]  # global ranks of every replica group
    sharding_group: "dist.ProcessGroup"
    replica_group: "dist.ProcessGroup | None"  # None with one replica

    @property
    def group_size(self) -> int:
        """L: ranks per sharding group."""
        return self.world_size // self.replicas

    def __str__(self) -> str:
        return (
            f"{self.world_size} ranks = {self.group_size} (sharding group) x {self.replicas} (replicas), {self.layout}: "
            f"sharding groups {self.sharding_groups}"
        )


def grid_ranks(world_size: int, replicas: int, layout: str = "shards_on_host"):
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


def make_grid(replicas: int = 1, layout: str = "shards_on_host") -> ShardingGrid:
    """Creates the grid's process groups (a collective: every rank calls it
    with the same arguments). Each group is new, so sharding collectives
    never interleave with DDP's on the default group."""
    world = dist.get_world_size()
    sharding, replica = grid_ranks(world, replicas, layout)
    me = dist.get_rank()
    my_sharding = my_replica = None
    for ranks in sharding:
        group = dist.new_group(ranks=ranks)
        if me in ranks:
            my_sharding = group
    if replicas > 1:
        for ranks in replica:
            group = dist.new_group(ranks=ranks)
            if me in ranks:
                my_replica = group
    return ShardingGrid(world, replicas, layout, sharding, replica, my_sharding, my_replica)
