"""Collectives that move ids and pooled embeddings, with byte counters.

Every collective the sharded collections issue goes through here, so that
``COMM_STATS`` knows how many bytes this rank sent to other ranks, per kind
of traffic (input all-to-all, output all-to-all and its backward, replica
sync, data-parallel exchange). The communication-volume benchmark reads it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

from dist_rec.distributed.shm_transport import transport_for
from dist_rec.fault.activity import ACTIVITY


class CommStats:
    """Bytes this rank sent to other ranks (its own share excluded), per kind."""

    def __init__(self) -> None:
        self.bytes_sent: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)

    def record(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()

    def snapshot(self) -> Dict[str, int]:
        return dict(self.bytes_sent)


COMM_STATS = CommStats()


def all_to_all(
    tensor: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group, kind: str, pending=None
) -> torch.Tensor:
    """``all_to_all_single`` of a 1-D tensor: ``send_splits[r]`` elements go
    to rank r of ``group``, ``recv_splits[r]`` come from it. With a
    ``pending`` list the collective runs in the background: its work handle
    is appended there, and the output must not be read before ``wait()``.
    Ranks of one host use the group's shared-memory all-to-all where the
    process-group owner made one (``dist_rec.distributed``); gloo otherwise."""
    send_splits, recv_splits = [int(s) for s in send_splits], [int(s) for s in recv_splits]
    ACTIVITY.note(kind)
    transport = transport_for(group) if tensor.device.type == "cpu" else None
    if transport is not None:  # ranks of one host: through shared memory
        output, work = transport.all_to_all(tensor, send_splits, recv_splits)
        if pending is None:
            work.wait()
    else:
        output = tensor.new_empty(sum(recv_splits))
        work = dist.all_to_all_single(
            output, tensor.contiguous(), recv_splits, send_splits, group=group, async_op=pending is not None
        )
    if pending is not None:
        pending.append(work)
    me = dist.get_rank(group)
    COMM_STATS.record(kind, (sum(send_splits) - send_splits[me]) * tensor.element_size())
    return output


def all_reduce_mean_(tensors: Sequence[torch.Tensor], group, kind: str) -> None:
    """Averages the tensors in place over ``group`` (float32 on the wire for
    half-precision tensors). One collective per tensor."""
    size = dist.get_world_size(group)
    ACTIVITY.note(kind)
    for tensor in tensors:
        wire = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.to(torch.float32)
        dist.all_reduce(wire, group=group)
        wire.div_(size)
        if wire is not tensor:
            tensor.copy_(wire)
        # A ring all-reduce sends 2 (size - 1) / size of the tensor per rank.
        COMM_STATS.record(kind, 2 * (size - 1) * wire.numel() * wire.element_size() // size)


def feature_major_order(rank_lengths: List[torch.Tensor], value_counts: List[int]) -> torch.Tensor:
    """Index into several ranks' concatenated values (each rank's values
    feature-major, lengths ``[F, B_rank]``) that lists feature 0 of every rank
    first, then feature 1, ...: the feature-major order of the joined batch."""
    device = rank_lengths[0].device
    per_feature = torch.stack([l.sum(dim=1) for l in rank_lengths], dim=1)  # [F, ranks] ids per (f, r)
    rank_base = torch.tensor([0] + list(value_counts[:-1]), dtype=torch.int64, device=device).cumsum(0)
    within_rank = torch.cumsum(per_feature, dim=0) - per_feature  # start of feature f inside rank r's values
    starts = (within_rank + rank_base).reshape(-1)  # (f, r) segments in the output order
    counts = per_feature.reshape(-1)
    total = int(counts.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    output_starts = torch.cumsum(counts, 0) - counts
    return torch.arange(total, device=device) + torch.repeat_interleave(starts - output_starts, counts)
