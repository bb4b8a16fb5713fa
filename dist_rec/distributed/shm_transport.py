"""All-to-alls among the ranks of one host, through shared memory.

Gloo moves an all-to-all over loopback TCP: on both sides its worker and
socket threads must get a core for every chunk. When the cores are busy
with the ranks' own compute (a CPU job runs a rank per core), those threads
wait for a time slice, and an all-to-all of a megabyte, 0.3 ms on idle
cores, takes several milliseconds in a training step. Here the ranks'
main threads copy the data themselves:

* every rank of the group maps one segment per rank from ``/dev/shm``; a
  segment holds its owner's outboxes, ``slots`` of ``slot_bytes`` per
  destination, and a header of int32 words: a doorbell, the pieces posted
  to each destination, the pieces consumed from each source;
* a message is cut into pieces of at most ``slot_bytes``; the sender copies
  a piece into a free slot of its outbox for the destination and publishes
  the new count (release store), the receiver copies it out and publishes
  its own count, which frees the slot; each rings the other's doorbell;
* ``all_to_all`` queues the pieces and moves whatever fits at once (the
  send side of a small message completes there); ``wait()`` moves the rest,
  sleeping on its doorbell (a futex) while nothing can move;
* a receiver may do more than copy a piece out: scale it on the way
  (``scale``), or add it to its own block (``sum_blocks``, the reduce of
  row-wise shards' partial sums), reading the slot in place: a large
  message is then read once, where a copy and a separate pass read it twice.

Pieces of one pair travel in the order the collectives were issued, which
every rank issues in the same order (as for any process group), so no
message carries a header. A peer that exits, a peer that aborted its
collectives (``abort``: a word of its header), or a wait past ``timeout``
raises ``CollectiveFailure`` instead of hanging.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from dist_rec.distributed.errors import CollectiveFailure
from dist_rec.ops.shm import shm_load, shm_ring, shm_sleep, shm_store

SLOT_BYTES = 2 << 20
SLOTS = 4
_MASK = 0xFFFFFFFF  # the header words are int32 counters; compare them modulo 2^32
_CHECK_PEERS_S = 0.5  # how long a wait sleeps without progress before checking the peers are alive
ENV = "DIST_REC_INTRA_HOST_ALL_TO_ALL"  # "shm" (default) or "gloo"

DEFAULT_TIMEOUT_S = 1800.0  # gloo's default: how long a wait for live but silent peers may last

# By process group. Filled only by ``intra_host_all_to_all``, which the
# process-group owner (``dist_rec.distributed.ProcessGroups``) calls;
# emptied by ``release``.
_TRANSPORTS: Dict[object, "ShmAllToAll"] = {}


class _Collective:
    """Pieces of one all-to-all still to move (both directions)."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = 0


class _Scale:
    """Fills a received piece with its slot times a factor."""

    __slots__ = ("factor",)

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, piece: torch.Tensor, slot: torch.Tensor, offset: int) -> None:
        torch.mul(slot, self.factor, out=piece)


class _AddTo:
    """Fills a received piece with its slot plus the same elements of this
    rank's own block; then hands it, as rows, to ``then`` (if any)."""

    __slots__ = ("own", "then", "row_width")

    def __init__(self, own: torch.Tensor, then=None, row_width: int = 1) -> None:
        self.own, self.then, self.row_width = own, then, row_width

    def __call__(self, piece: torch.Tensor, slot: torch.Tensor, offset: int) -> None:
        torch.add(self.own[offset : offset + piece.numel()], slot, out=piece)
        if self.then is not None:
            self.then(piece.view(-1, self.row_width), offset // self.row_width)


class ShmWork:
    """The handle ``all_to_all``, ``all_to_all_blocks`` and ``sum_blocks``
    return: ``wait()`` completes the collective (then runs ``after``, once,
    if given)."""

    def __init__(self, transport: "ShmAllToAll", collective: _Collective, after=None) -> None:
        self._transport, self._collective, self._after = transport, collective, after

    def wait(self) -> bool:
        self._transport.complete(self._collective)
        if self._after is not None:
            after, self._after = self._after, None
            after()
        return True


class ShmAllToAll:
    """All-to-alls over the ranks of ``group``, all on this host.

    A collective to set up (every rank of the group calls it); raises
    ``OSError`` if this rank cannot map every segment (``intra_host_all_to_all``
    agrees the fallback over the group)."""

    def __init__(
        self, group, slot_bytes: int = SLOT_BYTES, slots: int = SLOTS, timeout: float = DEFAULT_TIMEOUT_S, token: str = ""
    ) -> None:
        if int(slot_bytes) <= 0 or int(slot_bytes) % 8:
            # Slots start at multiples of it: a piece is read in place as its dtype.
            raise ValueError(f"Invalid slot_bytes={slot_bytes}: must be a positive multiple of 8.")
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.slot_bytes, self.slots, self.timeout = int(slot_bytes), int(slots), float(timeout)
        # doorbell, posted to each destination, consumed from each source, aborted
        words = 2 + 2 * self.size
        self._header_bytes = (4 * words + 63) // 64 * 64
        total = self._header_bytes + self.size * self.slots * self.slot_bytes
        path = _segment_path(token, self.rank)
        with open(path, "wb") as f:  # sparse: pages appear as they are written
            f.truncate(total)
        self._own_path = path
        self._paths = [_segment_path(token, r) for r in range(self.size)]
        self._total = total
        self.segments: List[torch.Tensor] = []
        self.flags: List[torch.Tensor] = []
        self._posted = [0] * self.size  # pieces this rank posted to each destination
        self._consumed = [0] * self.size  # pieces this rank consumed from each source
        # (collective, piece, how a received piece is filled or None for a copy, its offset in the message)
        self._sends: List[Deque[Tuple[_Collective, torch.Tensor, object, int]]] = [deque() for _ in range(self.size)]
        self._receives: List[Deque[Tuple[_Collective, torch.Tensor, object, int]]] = [deque() for _ in range(self.size)]
        self._peers = [r for r in range(self.size) if r != self.rank]
        self._pids: List[int] = []
        self._aborted: Optional[str] = None

    def map_peers(self, pids: Sequence[int]) -> None:
        """Maps every rank's segment (after all were created)."""
        for path in self._paths:
            segment = torch.from_file(path, shared=True, size=self._total, dtype=torch.uint8)
            self.segments.append(segment)
            self.flags.append(segment[: self._header_bytes].view(torch.int32))
        self._pids = list(pids)

    def close(self) -> None:
        """Drops the mappings and any queued pieces (the group is going away)."""
        self.segments, self.flags = [], []
        for queue in self._sends + self._receives:
            queue.clear()

    def unlink(self) -> None:
        """Removes this rank's file (the mappings stay)."""
        try:
            os.unlink(self._own_path)
        except FileNotFoundError:
            pass

    # -- words of the header ---------------------------------------------------

    def _posted_word(self, destination: int) -> int:
        return 1 + destination

    def _consumed_word(self, source: int) -> int:
        return 1 + self.size + source

    @property
    def _aborted_word(self) -> int:
        return 1 + 2 * self.size

    def abort(self, reason: str) -> None:
        """Stops every wait of this rank (it raises ``CollectiveFailure``)
        and tells the peers, whose waits raise too: this process is leaving
        its collectives (a recovery), however far each one got."""
        self._aborted = reason
        if not self.flags:
            return
        shm_store(self.flags[self.rank], self._aborted_word, 1)
        for peer in range(self.size):
            shm_ring(self.flags[peer], 0)

    def _outbox(self, owner: int, destination: int, slot: int) -> torch.Tensor:
        start = self._header_bytes + (destination * self.slots + slot) * self.slot_bytes
        return self.segments[owner][start : start + self.slot_bytes]

    # -- the collective -------------------------------------------------------

    def all_to_all(
        self, tensor: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], scale: Optional[float] = None
    ):
        """``(output, work)``: as ``dist.all_to_all_single`` of a 1-D tensor
        with ``async_op=True``, the output multiplied by ``scale`` (if given)
        as it arrives; the output must not be read before ``work.wait()``.
        ``tensor`` must not change until then."""
        return self.all_to_all_blocks(torch.split(tensor.reshape(-1).contiguous(), list(send_splits)), recv_splits, scale)

    def all_to_all_blocks(
        self, blocks: Sequence[torch.Tensor], recv_splits: Sequence[int], scale: Optional[float] = None,
        output: Optional[torch.Tensor] = None,
    ):
        """``all_to_all`` with rank r's message given as ``blocks[r]``
        (tensors of one dtype, anywhere: the same tensor may go to every
        rank, without a joined copy of them), received into ``output`` if
        given; this rank's own block is not copied where it already lies
        in its place in ``output`` (nor scaled: it is taken as it is)."""
        if len(blocks) != self.size or len(recv_splits) != self.size:
            raise ValueError(
                f"all_to_all_blocks needs one block and one receive count per rank ({self.size}); "
                f"got {len(blocks)} blocks and {len(recv_splits)} counts."
            )
        if output is None:
            output = blocks[0].new_empty(sum(recv_splits))
        collective = _Collective()
        for peer, (send, receive) in enumerate(zip(blocks, torch.split(output, list(recv_splits)))):
            send = send.reshape(-1).contiguous()  # an expanded gradient has stride 0
            if peer == self.rank:
                if send.data_ptr() == receive.data_ptr() and send.numel() == receive.numel():
                    pass  # already in place
                elif scale is None:
                    receive.copy_(send)
                else:
                    torch.mul(send, scale, out=receive)
                continue
            self._queue(peer, collective, send, receive, None if scale is None else _Scale(scale))
        self._progress()
        return output, ShmWork(self, collective)

    def sum_blocks(self, tensor: torch.Tensor, splits: Sequence[int], row_width: int = 1, then=None):
        """``(output, work)``: a reduce-scatter (sum) of a 1-D tensor over a
        group of two ranks: block r of ``tensor`` (``splits[r]`` elements)
        goes to rank r, and ``output`` (this rank's ``splits[rank]``
        elements, the same on both ranks) is the sum of the two ranks'
        blocks. The peer's block is added to this rank's straight out of
        the slots, so no copy of either is made (two ranks: the order of
        the sum does not change its bits).

        ``then(rows, first_row)``, if given, runs on the output viewed as
        rows of ``row_width`` elements: on each piece of whole rows as soon
        as it is summed (while it is in cache), or on all of it at
        ``wait()`` where a row does not fit a slot. Both ranks must pass
        the same ``row_width``."""
        if self.size != 2:
            raise ValueError(f"sum_blocks adds two ranks' blocks; this group has {self.size} ranks.")
        tensor = tensor.reshape(-1).contiguous()
        blocks = torch.split(tensor, list(splits))
        peer, own = 1 - self.rank, blocks[self.rank]
        output = tensor.new_empty(own.numel())
        if row_width < 1:
            raise ValueError(f"Invalid row_width={row_width}: must be >= 1.")
        # Pieces of whole rows where a row fits a slot, whether or not
        # ``then`` is given: both ranks cut the message alike.
        rows_per_piece = self.slot_bytes // (row_width * tensor.element_size())
        in_pieces = rows_per_piece > 0
        after = None
        if then is not None and not in_pieces:
            def after():
                then(output.view(-1, row_width), 0)
        collective = _Collective()
        per_piece = rows_per_piece * row_width if in_pieces else None
        self._queue(peer, collective, blocks[peer], output, _AddTo(own, then if in_pieces else None, row_width), per_piece)
        self._progress()
        return output, ShmWork(self, collective, after)

    def _queue(
        self, peer: int, collective: _Collective, send: torch.Tensor, receive: torch.Tensor, apply,
        per_piece: Optional[int] = None,
    ) -> None:
        """Queues ``send`` (1-D) to ``peer`` and ``receive`` (1-D, same dtype)
        from it, cut into pieces of whole elements (``per_piece``, at most
        a slot's worth; both ranks cut a message alike); ``apply(piece,
        slot, offset)`` fills a received piece from its slot (a copy if
        None). An empty message has no pieces on either side."""
        if per_piece is None:
            per_piece = self.slot_bytes // send.element_size()
        for piece in torch.split(send, per_piece) if send.numel() else ():
            self._sends[peer].append((collective, piece.view(torch.uint8), None, 0))
            collective.pending += 1
        offset = 0
        for piece in torch.split(receive, per_piece) if receive.numel() else ():
            self._receives[peer].append((collective, piece, apply, offset))
            collective.pending += 1
            offset += piece.numel()

    def _progress(self) -> bool:
        """Moves every piece that can move now; whether any did."""
        moved = False
        me, my_flags = self.rank, self.flags[self.rank]
        for peer in self._peers:
            queue = self._sends[peer]
            while queue:
                posted = self._posted[peer]
                consumed = shm_load(self.flags[peer], self._consumed_word(me))
                if (posted - consumed) & _MASK >= self.slots:
                    break  # every slot to this peer still holds an unread piece
                collective, piece, _, _ = queue.popleft()
                self._outbox(me, peer, posted % self.slots)[: piece.numel()].copy_(piece)
                self._posted[peer] = posted + 1
                shm_store(my_flags, self._posted_word(peer), (posted + 1) & _MASK)
                shm_ring(self.flags[peer], 0)
                collective.pending -= 1
                moved = True
        for peer in self._peers:
            queue = self._receives[peer]
            while queue:
                got = self._consumed[peer]
                available = shm_load(self.flags[peer], self._posted_word(me))
                if (available - got) & _MASK == 0:
                    break
                collective, piece, apply, offset = queue.popleft()
                slot = self._outbox(peer, me, got % self.slots)[: piece.numel() * piece.element_size()].view(piece.dtype)
                if apply is None:
                    piece.copy_(slot)
                else:
                    try:
                        apply(piece, slot, offset)
                    except Exception as error:  # the peers must not wait for a count never published
                        self.abort(f"a received piece could not be processed: {error}")
                        raise
                self._consumed[peer] = got + 1
                shm_store(my_flags, self._consumed_word(peer), (got + 1) & _MASK)
                shm_ring(self.flags[peer], 0)
                collective.pending -= 1
                moved = True
        return moved

    def complete(self, collective: _Collective) -> None:
        """Moves pieces until ``collective`` has none left (earlier
        collectives' pieces move first, in order)."""
        my_flags = self.flags[self.rank]
        started = idle_since = time.monotonic()
        while collective.pending:
            if self._aborted is not None:
                raise CollectiveFailure(f"Intra-host all-to-all: rank {self.rank} aborted its collectives ({self._aborted}).")
            bell = shm_load(my_flags, 0)
            if self._progress():
                idle_since = time.monotonic()
                continue
            shm_sleep(my_flags, 0, bell, int(_CHECK_PEERS_S * 1000))
            now = time.monotonic()
            if now - idle_since >= _CHECK_PEERS_S:
                self._check_peers(now - started)
                idle_since = now

    def _check_peers(self, waited: float) -> None:
        for peer in self._peers:
            if not _alive(self._pids[peer]):
                raise CollectiveFailure(
                    f"Intra-host all-to-all: rank {peer} of the group (pid {self._pids[peer]}) has exited; "
                    f"rank {self.rank} stops instead of waiting for it."
                )
            if shm_load(self.flags[peer], self._aborted_word):
                raise CollectiveFailure(
                    f"Intra-host all-to-all: rank {peer} of the group (pid {self._pids[peer]}) aborted its collectives; "
                    f"rank {self.rank} stops instead of waiting for it."
                )
        if waited > self.timeout:
            raise CollectiveFailure(
                f"Intra-host all-to-all: rank {self.rank} waited {waited:.0f} s (timeout {self.timeout:.0f} s) for its "
                "peers; they are alive but did not take part (are all ranks issuing the same collectives?)."
            )


def _segment_path(token: str, rank: int) -> str:
    return f"/dev/shm/dist_rec_a2a_{token}_{rank}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited child not yet reaped is a zombie: dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def intra_host_all_to_all(
    group, device: torch.device, slot_bytes: int = SLOT_BYTES, slots: int = SLOTS, timeout: float = DEFAULT_TIMEOUT_S
) -> Optional[ShmAllToAll]:
    """The shared-memory all-to-all of ``group`` (made once per group), or
    None where it does not apply: CUDA tensors, one rank, ``DIST_REC_INTRA_HOST_ALL_TO_ALL=gloo``,
    or a rank that cannot map every rank's segment (not one host, no
    ``/dev/shm``): then gloo carries the group's all-to-alls. A collective
    over ``group`` (every rank decides the same)."""
    if group in _TRANSPORTS:
        return _TRANSPORTS[group]
    if torch.device(device).type != "cpu" or dist.get_world_size(group) < 2:
        return None
    if os.environ.get(ENV, "shm").lower() != "shm":
        return None
    first = dist.get_process_group_ranks(group)[0]
    token = [uuid.uuid4().hex if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(token, src=first, group=group)
    transport: Optional[ShmAllToAll] = None
    try:
        transport = ShmAllToAll(group, slot_bytes=slot_bytes, slots=slots, timeout=timeout, token=token[0])
    except OSError:
        transport = None
    pids: List[Optional[int]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(pids, os.getpid() if transport is not None else None, group=group)
    mapped = torch.tensor([1 if transport is not None and None not in pids else 0])
    if mapped.item():
        try:
            transport.map_peers(pids)
        except (OSError, RuntimeError):
            mapped.zero_()
    dist.all_reduce(mapped, op=dist.ReduceOp.MIN, group=group)  # every rank mapped every segment
    if transport is not None:
        transport.unlink()  # every rank has mapped it, or gave up
    if not mapped.item():
        return None
    _TRANSPORTS[group] = transport
    return transport


def transport_for(group) -> Optional[ShmAllToAll]:
    """The group's shared-memory all-to-all, if ``intra_host_all_to_all`` made one."""
    return _TRANSPORTS.get(group)


def abort_all(reason: str) -> None:
    """``abort`` on every transport of this process."""
    for transport in list(_TRANSPORTS.values()):
        transport.abort(reason)


def release(group) -> None:
    """Forgets the group's transport (its mappings go with the last
    reference): the owner calls it before the group is destroyed."""
    transport = _TRANSPORTS.pop(group, None)
    if transport is not None:
        transport.close()
