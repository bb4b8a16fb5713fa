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

from dist_rec.sharding.shm_transport import transport_for


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
    Ranks of one host use the group's shared-memory all-to-all where
    ``shm_transport.intra_host_all_to_all`` made one; gloo otherwise."""
    send_splits, recv_splits = [int(s) for s in send_splits], [int(s) for s in recv_splits]
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


class _OutputBox:
    """What the two halves of one output all-to-all share: the sizes, and
    the collective in flight (the forward's, then the backward's)."""

    def __init__(self, batch_sizes: List[int], widths: List[int], group, grad_scale: float) -> None:
        self.batch_sizes, self.widths, self.group, self.grad_scale = batch_sizes, widths, group, grad_scale
        self.work = None
        self.pooled = None  # this rank's pooled rows, as the graph knows them


def start_output_dist(pooled: torch.Tensor, batch_sizes: List[int], widths: List[int], group, grad_scale: float):
    """Starts sending pooled rows back to the ranks that own the samples.

    This rank's ``pooled`` ``[sum_q B_q, W_me]`` (rows of source q
    contiguous, in rank order) is split by source; rank q receives its
    ``[B_q, W_r]`` block from every rank r, flat and in rank order (the
    caller views the blocks in place). Returns ``(buffer, box)``; the
    caller reads the buffer through ``finish_output_dist(buffer, box)``,
    which waits for it, as late as it can (the dense layers compute
    meanwhile).

    The backward is split the same way: ``OutputDist``'s backward, which
    autograd runs as soon as the gradient of the joined columns is known
    (its node is younger than the dense layers'), starts the reverse
    all-to-all; ``_WaitGradient``'s, older than the dense layers', waits for
    it just before the local lookup's backward. The dense layers' backward
    (and DDP's all-reduce launch) runs while the gradients travel. The
    gradients are multiplied by ``grad_scale`` (on arrival, in the received
    buffer, so that no scaled copy is made): 1 / ranks, so that a step of
    the group trains like one process on the group's whole batch with the
    mean of the ranks' losses, as DDP averages dense gradients.
    """
    box = _OutputBox(batch_sizes, widths, group, grad_scale)
    box.pooled = _WaitGradient.apply(pooled, box)
    me = dist.get_rank(group)
    pending: List = []
    received = all_to_all(
        box.pooled.detach().reshape(-1),
        [b * widths[me] for b in batch_sizes],
        [batch_sizes[me] * w for w in widths],
        group,
        "output_dist",
        pending,
    )
    box.work = pending[0]
    return received, box


class _WaitGradient(torch.autograd.Function):
    """Identity; its backward waits for the gradient all-to-all that
    ``OutputDist``'s backward started."""

    @staticmethod
    def forward(ctx, pooled, box):
        ctx.box = box
        return pooled.view_as(pooled)

    @staticmethod
    def backward(ctx, grad):
        box = ctx.box
        box.work.wait()
        box.work = None
        if box.grad_scale != 1.0:
            grad.mul_(box.grad_scale)  # the all-to-all's own buffer: scaled in place
        return grad, None


def finish_output_dist(received: torch.Tensor, box: _OutputBox) -> torch.Tensor:
    """The buffer of ``start_output_dist``, filled, on the autograd graph."""
    return OutputDist.apply(box.pooled, received, box)


class OutputDist(torch.autograd.Function):
    """The received pooled rows (waits for the forward all-to-all); its
    backward starts the gradients' all-to-all and returns its buffer,
    not yet filled (``_WaitGradient`` waits before anyone reads it)."""

    @staticmethod
    def forward(ctx, pooled, received, box):
        ctx.box = box
        box.work.wait()
        box.work = None
        return received

    @staticmethod
    def backward(ctx, grad):
        box = ctx.box
        me = dist.get_rank(box.group)
        batch_sizes, widths = box.batch_sizes, box.widths
        pending: List = []
        received = all_to_all(
            grad.reshape(-1),  # unscaled: _WaitGradient scales what arrives, in place
            [batch_sizes[me] * w for w in widths],
            [b * widths[me] for b in batch_sizes],
            box.group,
            "output_dist_backward",
            pending,
        )
        box.work = pending[0]
        return received.view(sum(batch_sizes), widths[me]), None, None
