"""The ranks a plan is made for: how many, how much memory each, how grouped."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

COMPUTE_DEVICES = ("cpu", "cuda")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class Topology:
    """One sharding group of ranks, as the planner sees it.

    Args:
        world_size (int): ranks in the sharding group; a plan uses ranks
            0 .. world_size - 1.
        memory_per_rank_bytes (int or Sequence[int]): bytes each rank may
            give to embedding tables and their optimizer state: one budget
            for all ranks, or one per rank. Normalised to a tuple of
            ``world_size`` ints.
        local_world_size (Optional[int]): ranks per host; must divide
            ``world_size``. Table-row-wise sharding keeps a table inside one
            host. (Default: None, all ranks on one host)
        compute_device (str): "cpu" or "cuda". (Default: "cpu")

    Example::

        # 2 hosts x 4 GPUs, 16 GiB of each GPU for tables
        Topology(world_size=8, memory_per_rank_bytes=16 << 30, local_world_size=4, compute_device="cuda")
    """

    world_size: int
    memory_per_rank_bytes: Union[int, Sequence[int]]
    local_world_size: Union[int, None] = None
    compute_device: str = "cpu"

    def __post_init__(self) -> None:
        if not _is_int(self.world_size) or self.world_size < 1:
            raise ValueError(f"Invalid world_size={self.world_size!r}. Must be an int >= 1.")
        memory = self.memory_per_rank_bytes
        if _is_int(memory) and memory > 0:
            budgets = (int(memory),) * self.world_size
        elif (
            isinstance(memory, (list, tuple))
            and len(memory) == self.world_size
            and all(_is_int(m) and m > 0 for m in memory)
        ):
            budgets = tuple(int(m) for m in memory)
        else:
            shown = list(memory) if isinstance(memory, tuple) else memory
            raise ValueError(
                f"Invalid memory_per_rank_bytes={shown!r}. "
                f"Must be an int > 0 or a list of world_size={self.world_size} ints > 0."
            )
        self.memory_per_rank_bytes = budgets
        if self.local_world_size is None:
            self.local_world_size = self.world_size
        if not _is_int(self.local_world_size) or self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ValueError(
                f"Invalid local_world_size={self.local_world_size!r}. "
                f"Must be an int >= 1 that divides world_size={self.world_size}."
            )
        if self.compute_device not in COMPUTE_DEVICES:
            raise ValueError(
                f"Invalid compute_device={self.compute_device!r}. Must be one of {', '.join(COMPUTE_DEVICES)}."
            )

    @property
    def budgets(self) -> Tuple[int, ...]:
        """Memory budget of each rank, in bytes."""
        return self.memory_per_rank_bytes  # a tuple after __post_init__

    @property
    def num_hosts(self) -> int:
        return self.world_size // self.local_world_size

    def hosts(self) -> List[List[int]]:
        """The ranks of each host, in order: host h holds ranks
        ``h * local_world_size .. (h + 1) * local_world_size - 1``."""
        n = self.local_world_size
        return [list(range(h * n, (h + 1) * n)) for h in range(self.num_hosts)]
