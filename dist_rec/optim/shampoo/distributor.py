"""Spreading Shampoo's blocks over data-parallel ranks.

Under DDP every rank holds the same averaged gradient, so computing every
block's search direction on every rank is pure duplication. Each block is
instead owned by one rank, which alone keeps its statistics and roots and
computes its direction; the directions are then all-gathered so that every
rank applies the same update. Optimizer memory and compute fall with the
number of ranks; the price is one all-gather of the update per step.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from dist_rec.optim.shampoo.blocking import Block

COMMUNICATION_DTYPES = (None, torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DDPShampooConfig:
    """Distributed mode of ``DistributedShampoo``.

    Args:
        communication_dtype (Optional[torch.dtype]): dtype the search
            directions travel in; None keeps the parameters' dtype. bf16 or
            fp16 halve the all-gather at the cost of rounding the update.
        process_group: the data-parallel group (None: the default group).
    """

    communication_dtype: Optional[torch.dtype] = None
    process_group: Optional[dist.ProcessGroup] = None

    def __post_init__(self) -> None:
        if self.communication_dtype not in COMMUNICATION_DTYPES:
            raise ValueError(
                f"Invalid communication_dtype={self.communication_dtype}. Must be None, torch.float64, "
                "torch.float32, torch.bfloat16 or torch.float16."
            )


def assign_blocks(blocks: Sequence[Block], world_size: int) -> List[int]:
    """Owner rank of every block: largest cost first onto the least-loaded
    rank (ties to the lower rank), the same answer on every rank."""
    owners = [0] * len(blocks)
    loads = [(0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    for index in sorted(range(len(blocks)), key=lambda i: (-blocks[i].cost, i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + blocks[index].cost, rank))
    return owners


def all_gather_directions(
    stepped: Sequence[int],
    owners: Sequence[int],
    blocks: Sequence[Block],
    local: Dict[int, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    group: Optional[dist.ProcessGroup],
) -> Dict[int, torch.Tensor]:
    """Every stepped block's direction on every rank.

    ``stepped`` lists the blocks updated this step (the same on every rank),
    ``local`` this rank's directions. Each rank packs its blocks into one
    flat buffer, padded to the longest, and one all-gather delivers them; the
    rank's own blocks are read back from the gathered copy too, so that every
    rank applies bitwise the same update whatever the communication dtype.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    by_rank: List[List[int]] = [[] for _ in range(world)]
    for b in stepped:
        by_rank[owners[b]].append(b)
    width = max(sum(blocks[b].numel for b in mine) for mine in by_rank)
    if width == 0:
        return {}
    send = torch.zeros(width, dtype=dtype, device=device)
    offset = 0
    for b in by_rank[rank]:
        n = blocks[b].numel
        send[offset : offset + n] = local[b].reshape(-1)
        offset += n
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send, group=group)
    directions: Dict[int, torch.Tensor] = {}
    for r, theirs in enumerate(by_rank):
        offset = 0
        for b in theirs:
            n = blocks[b].numel
            directions[b] = received[r][offset : offset + n].view(blocks[b].shape)
            offset += n
    return directions
