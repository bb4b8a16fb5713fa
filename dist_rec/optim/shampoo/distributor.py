"""Spreading Shampoo's blocks over data-parallel ranks.

Under DDP every rank holds the same averaged gradient, so computing every
block's search direction on every rank is pure duplication. Each block is
instead owned by one rank, which alone keeps its statistics and roots and
computes its direction; the directions are then all-gathered so that every
rank applies the same update. Optimizer memory and compute fall with the
number of ranks; the price is an all-gather of the update per step, cut
into buckets that travel while the next ones compute.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

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
        bucket_numel (int): the directions travel in buckets of about this
            many elements, each all-gathered in the background while the
            next bucket's directions compute. (Default: 2**20)
    """

    communication_dtype: Optional[torch.dtype] = None
    process_group: Optional[dist.ProcessGroup] = None
    bucket_numel: int = 1 << 20

    def __post_init__(self) -> None:
        if isinstance(self.bucket_numel, bool) or not isinstance(self.bucket_numel, int) or self.bucket_numel < 1:
            raise ValueError(f"Invalid bucket_numel={self.bucket_numel!r}. Must be an int >= 1.")
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


def buckets(stepped: Sequence[int], blocks: Sequence[Block], bucket_numel: int) -> List[List[int]]:
    """``stepped`` cut into consecutive runs of about ``bucket_numel``
    elements (a block is never split): the same cut on every rank."""
    out: List[List[int]] = []
    size = 0
    for b in stepped:
        if not out or size >= bucket_numel:
            out.append([])
            size = 0
        out[-1].append(b)
        size += blocks[b].numel
    return out


class DirectionBucket:
    """One bucket's directions on their way to every rank.

    Each rank writes the directions of the blocks it owns into one flat
    buffer (``put``), padded to the longest rank's share; ``start`` launches
    the all-gather in the background and ``finish`` waits for it. A rank reads
    its own blocks back from the gathered copy too, so that every rank
    applies bitwise the same update whatever the communication dtype.
    """

    def __init__(
        self,
        bucket: Sequence[int],
        owners: Sequence[int],
        blocks: Sequence[Block],
        rank: int,
        world: int,
        dtype: torch.dtype,
        device: torch.device,
        group: Optional[dist.ProcessGroup],
    ) -> None:
        self._group = group
        by_rank: List[List[int]] = [[] for _ in range(world)]
        for b in bucket:
            by_rank[owners[b]].append(b)
        # Where each block sits in its owner's flat buffer: (block, slice, shape).
        self._layout: List[List[Tuple[int, slice, Tuple[int, ...]]]] = []
        for mine in by_rank:
            offset, places = 0, []
            for b in mine:
                places.append((b, slice(offset, offset + blocks[b].numel), blocks[b].shape))
                offset += blocks[b].numel
            self._layout.append(places)
        self.width = max(places[-1][1].stop if places else 0 for places in self._layout)
        own = self._layout[rank]
        self._send = torch.empty(self.width, dtype=dtype, device=device)
        self._send[own[-1][1].stop if own else 0 :].zero_()
        self._slots = {b: where for b, where, _ in own}
        self._received: List[torch.Tensor] = []
        self._work = None

    def put(self, b: int, direction: torch.Tensor) -> None:
        """This rank's direction of its block ``b``."""
        self._send[self._slots[b]].view(direction.shape).copy_(direction)

    def start(self) -> None:
        self._received = [torch.empty_like(self._send) for _ in self._layout]
        self._work = dist.all_gather(self._received, self._send, group=self._group, async_op=True)

    def finish(self) -> Dict[int, torch.Tensor]:
        """Every block of the bucket's direction (views of the gathered buffers)."""
        self._work.wait()
        return {
            b: received[where].view(shape)
            for received, places in zip(self._received, self._layout)
            for b, where, shape in places
        }
