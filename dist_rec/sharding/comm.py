"""Collectives that move ids and pooled embeddings, with byte counters.

Every collective the sharded collections issue goes through here, so that
``COMM_STATS`` knows how many bytes this rank sent to other ranks, per kind
of traffic (input all-to-all, output all-to-all and its backward, replica
sync, data-parallel exchange). The communication-volume benchmark reads it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence

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
    tensor: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group, kind: str, pending=None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """``all_to_all_single`` of a 1-D tensor: ``send_splits[r]`` elements go
    to rank r of ``group``, ``recv_splits[r]`` come from it; the output is
    multiplied by ``scale``, if given (on arrival where the ranks share a
    host). With a ``pending`` list the collective runs in the background:
    its work handle is appended there, and the output must not be read
    before ``wait()``. Ranks of one host use the group's shared-memory
    all-to-all where the process-group owner made one
    (``dist_rec.distributed``); gloo otherwise."""
    send_splits, recv_splits = [int(s) for s in send_splits], [int(s) for s in recv_splits]
    ACTIVITY.note(kind)
    transport = transport_for(group) if tensor.device.type == "cpu" else None
    if transport is not None:  # ranks of one host: through shared memory
        output, work = transport.all_to_all(tensor, send_splits, recv_splits, scale)
    else:
        output, work = _gloo_all_to_all(tensor.reshape(-1), send_splits, recv_splits, group, pending is not None, scale)
    return _started(output, work, pending, kind, send_splits, group, tensor.element_size())


def all_to_all_blocks(
    blocks: Sequence[torch.Tensor], recv_splits: Sequence[int], group, kind: str, pending=None,
    scale: Optional[float] = None, output: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``all_to_all`` with rank r's message given as ``blocks[r]``: the same
    tensor may go to several ranks, and through shared memory no joined
    send buffer is made (gloo needs one). With ``output``, the message
    arrives there; this rank's own block may already lie in its place
    (it is then taken as it is, not scaled)."""
    recv_splits = [int(s) for s in recv_splits]
    send_splits = [b.numel() for b in blocks]
    ACTIVITY.note(kind)
    if output is not None and scale is not None:
        raise ValueError("all_to_all_blocks: scale a message whose own block lies in the output before sending it.")
    transport = transport_for(group) if blocks[0].device.type == "cpu" else None
    if transport is not None:
        output, work = transport.all_to_all_blocks(blocks, recv_splits, scale, output)
    else:
        joined = torch.cat([b.reshape(-1) for b in blocks])
        output, work = _gloo_all_to_all(joined, send_splits, recv_splits, group, pending is not None, scale, output)
    return _started(output, work, pending, kind, send_splits, group, blocks[0].element_size())


def sum_row_shards(
    tensor: torch.Tensor, splits: Sequence[int], group, kind: str, pending=None, row_width: int = 1, then=None
) -> torch.Tensor:
    """A reduce-scatter (sum) of a 1-D tensor: block r (``splits[r]``
    elements; every rank passes the same ``splits``) goes to rank r of
    ``group``, and the output (``splits[me]`` elements) is the sum of every
    rank's block for this rank, added in rank order (the same bits on every run).
    Two ranks of one host add the peer's block straight out of shared
    memory; otherwise the blocks arrive by ``all_to_all`` and are added on
    ``wait()``. ``then(rows, first_row)``, if given, runs on the summed
    output as rows of ``row_width`` (on pieces as they are summed, or on
    all of it). ``pending`` as for ``all_to_all``."""
    splits = [int(s) for s in splits]
    me, size = dist.get_rank(group), dist.get_world_size(group)
    transport = transport_for(group) if tensor.device.type == "cpu" else None
    if transport is not None and size == 2:
        ACTIVITY.note(kind)
        output, work = transport.sum_blocks(tensor, splits, row_width, then)
        return _started(output, work, pending, kind, splits, group, tensor.element_size())
    inner: List = []
    received = all_to_all(tensor, splits, [splits[me]] * size, group, kind, inner)
    output = tensor.new_empty(splits[me])
    work = _SumOnWait(inner[0], received.view(size, splits[me]), output, row_width, then)
    if pending is None:
        work.wait()
    else:
        pending.append(work)
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


def feature_major(rank_lengths: List[torch.Tensor], rank_values: List[torch.Tensor]) -> torch.Tensor:
    """Several ranks' values (each rank's feature-major, with lengths
    ``[F, B_rank]``) joined in the feature-major order of the joined batch:
    feature 0 of every rank first, then feature 1, ... One copy of F x ranks
    slices, where an index of every value (arange, repeat_interleave, add,
    gather) cost four passes over the batch."""
    per_feature = torch.stack([l.sum(dim=1) for l in rank_lengths], dim=1).tolist()  # [F][ranks] values per (f, r)
    if not per_feature:
        return torch.cat([v[:0] for v in rank_values])
    slices = [torch.split(v, [counts[q] for counts in per_feature]) for q, v in enumerate(rank_values)]
    return torch.cat([slices[q][f] for f in range(len(per_feature)) for q in range(len(rank_values))])


def _gloo_all_to_all(
    tensor, send_splits, recv_splits, group, background: bool, scale: Optional[float], output=None
):
    if output is None:
        output = tensor.new_empty(sum(recv_splits))
    work = dist.all_to_all_single(output, tensor.contiguous(), recv_splits, send_splits, group=group, async_op=background)
    if scale is None:
        return output, work
    if work is None:
        output.mul_(scale)
        return output, None
    return output, _ScaleOnWait(work, output, scale)


def _started(output, work, pending, kind: str, send_splits: List[int], group, element_size: int) -> torch.Tensor:
    """Hands the work to ``pending``, or waits for it; counts the bytes."""
    if pending is not None:
        pending.append(work)
    elif work is not None:
        work.wait()
    me = dist.get_rank(group)
    COMM_STATS.record(kind, (sum(send_splits) - send_splits[me]) * element_size)
    return output


class _ScaleOnWait:
    """A gloo work whose output is scaled once it has arrived."""

    def __init__(self, work, output: torch.Tensor, scale: float) -> None:
        self._work, self._output, self._scale = work, output, scale

    def wait(self) -> bool:
        if self._work is not None:
            self._work.wait()
            self._work = None
            self._output.mul_(self._scale)
        return True


class _SumOnWait:
    """An all-to-all of row shards' blocks whose ``output`` is their sum, in
    rank order, once they have arrived (then ``then(rows, 0)``, if given)."""

    def __init__(self, work, blocks: torch.Tensor, output: torch.Tensor, row_width: int = 1, then=None) -> None:
        self._work, self._blocks, self._output = work, blocks, output
        self._row_width, self._then = row_width, then

    def wait(self) -> bool:
        if self._work is not None:
            self._work.wait()
            self._work = None
            blocks, output = self._blocks, self._output
            if len(blocks) == 1:
                output.copy_(blocks[0])
            else:
                torch.add(blocks[0], blocks[1], out=output)
                for block in blocks[2:]:
                    output.add_(block)
            self._blocks = None
            if self._then is not None:
                self._then(output.view(-1, self._row_width), 0)
        return True
