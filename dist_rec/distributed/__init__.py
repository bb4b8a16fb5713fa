"""Process groups and transports: the one place that creates them.

* ``init_process_group`` / ``init_single_process_group``: join the job's
  default group (``world.py``), keeping the store so it can be re-formed.
* ``ProcessGroups``: the 2D grid's sharding and replica groups, named
  sub-groups, their intra-host shared-memory all-to-alls, and ``rebuild``.
* ``ShardingGrid`` / ``grid_ranks``: the grid as plain ranks (``grid.py``).
* ``shm_transport``: the intra-host all-to-all itself.

Nothing outside this package calls ``new_group`` or ``init_process_group``.
"""

from dist_rec.distributed.grid import LAYOUTS, ShardingGrid, grid_ranks
from dist_rec.distributed.process_groups import ProcessGroups, default_process_groups
from dist_rec.distributed.world import (
    destroy_process_group,
    generation,
    init_process_group,
    init_single_process_group,
)

__all__ = [
    "LAYOUTS",
    "ProcessGroups",
    "ShardingGrid",
    "default_process_groups",
    "destroy_process_group",
    "generation",
    "grid_ranks",
    "init_process_group",
    "init_single_process_group",
]
