"""What a save writes, copied out of the live tables at its step.

A save splits in two (CheckFreq's snapshot / persist): on the training
thread ``take_snapshot`` copies what the save needs into host buffers,
and only that stalls training; a background writer then persists the copy
(``writer.py``) while training goes on.

What a snapshot holds depends on the checkpoint policy (CPR; Check-N-Run):

* ``full`` (and every ``base_every``-th save of the others): every row of
  every shard and its row-wise state;
* ``incremental``: every row changed since it was last saved, exactly: base
  plus deltas in order equal a full save bitwise;
* ``mfu`` (CPR-MFU): of the rows changed since they were last saved, the
  most frequently used (access counts since the start), at most
  ``mfu_fraction`` of each shard's rows per save; the rest wait for a later
  save or the next base;
* ``ssu`` (CPR-SSU): a uniform sample (``ssu_fraction``) of the rows changed
  since they were last saved (a row left out stays due).

A delta names its rows by id or by bitmap, and stores their weights exact
or, with ``delta_bits`` 8 or 4, as quantised changes since the previous
save (``delta.py``); a quantised delta needs the saver's reference, which
is the base's copy in the ``SnapshotBuffers``, moved by every delta.

Changed rows and access counts come from ``RowTracker``s attached to the
local lookups: the ids of each fused update are marked in a bitmap (and
counted with an ``index_add`` for MFU), no sort; a save clears the bits of
the rows it writes. Under 2D parallelism the replicas' bitmaps are joined
over the replica group at the snapshot (a row changed only by another
replica changed here at the last sync too), so every replica selects the
same rows; exactness under 2D holds for saves on replica-sync steps.
Data-parallel tables and the dense state are small and saved whole every
time.
"""

from __future__ import annotations

import functools
import math
import threading
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from dist_rec.checkpoint.delta import encode_rows, encode_weights
from dist_rec.checkpoint.files import component

POLICIES = ("full", "incremental", "mfu", "ssu")


class RowTracker:
    """Rows of one storage's tables changed since they were last saved
    (``dirty``: set by every fused update, cleared for the rows a save
    writes), and (``counts``) how often each row was looked up."""

    def __init__(self, storage, counts: bool = False) -> None:
        device = storage.device
        self.dirty = [torch.zeros(spec.num_rows, dtype=torch.bool, device=device) for spec in storage.tables]
        self.counts = (
            [torch.zeros(spec.num_rows, dtype=torch.int32, device=device) for spec in storage.tables] if counts else None
        )

    def record(self, layout, indices_N: torch.Tensor, offsets: torch.Tensor) -> None:
        feature_table = layout[0]
        slots = len(feature_table)
        if not slots or indices_N.numel() == 0:
            return
        batch = (offsets.numel() - 1) // slots
        bounds = offsets[::batch].tolist() if batch else [0] * (slots + 1)
        for slot, table in enumerate(feature_table):
            ids = indices_N[bounds[slot] : bounds[slot + 1]]
            if ids.numel():
                self.dirty[table][ids] = True
                if self.counts is not None:
                    self.counts[table].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def saved(self, table: int, rows: Optional[torch.Tensor] = None) -> None:
        """``rows`` of ``table`` (every row when None) were written: clean again."""
        if rows is None:
            self.dirty[table].zero_()
        else:
            self.dirty[table][rows.to(self.dirty[table].device)] = False


@dataclass
class SavePolicy:
    """The checkpoint policy's knobs (``checkpoint`` config section)."""

    policy: str = "full"
    base_every: int = 5
    mfu_fraction: float = 0.1
    ssu_fraction: float = 0.1
    seed: int = 0
    delta_bits: int = 32

    @property
    def tracks(self) -> bool:
        return self.policy != "full"

    @property
    def quantises(self) -> bool:
        return self.tracks and self.delta_bits < 32

    @property
    def counts(self) -> bool:
        return self.policy == "mfu"


@dataclass
class Item:
    """One file of a snapshot."""

    file: str
    kind: str  # "shard" | "delta" | "data_parallel" | "dense"
    tensors: Dict
    module: str = ""
    table: str = ""
    rect: tuple = ()
    shard_rank: int = -1
    # Run by the writer before anything else (off the training thread): the
    # tensors as the file stores them (a delta's row bitmap, quantised weights).
    encode: Optional[Callable[[Dict], Dict]] = None


@dataclass
class Snapshot:
    step: int
    kind: str  # "base" | "delta"
    items: List[Item] = field(default_factory=list)
    rows_saved: int = 0
    rows_total: int = 0

    @property
    def nbytes(self) -> int:
        total = 0
        for item in self.items:
            if item.kind == "dense":
                continue
            total += sum(t.numel() * t.element_size() for t in item.tensors.values())
        return total


class SnapshotBuffers:
    """One checkpointer's host buffers, reused from one base snapshot to the
    next (never shared: a writer may still be reading them): copying into
    pages already faulted in is several times faster than into new ones.
    They sit on transparent huge pages (512x fewer faults) and can be
    mapped ahead, off the training thread (``prepare``), so that the first
    save does not pay for them either."""

    def __init__(self) -> None:
        self._held: Dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.references: Dict[str, torch.Tensor] = {}  # shard file -> weights a load rebuilds (quantised deltas)

    def get(self, key, shape, dtype) -> torch.Tensor:
        key = (key, tuple(shape), dtype)
        with self._lock:
            buffer = self._held.get(key)
            if buffer is None:
                from dist_rec.ops.embedding_bag import empty_hugepage

                buffer = self._held[key] = empty_hugepage(list(shape), dtype)
        return buffer

    def copy(self, key, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self.get(key, tensor.shape, tensor.dtype)
        buffer.copy_(tensor)
        return buffer

    def prepare(self, model) -> None:
        """Allocates and touches the buffers a base snapshot of ``model`` on
        this rank will use (every page written once: mapped)."""
        for path, name, local in _shard_names(model):
            rows = local.shard.num_rows
            if rows == 0:
                continue
            weight, state = local.read(0, 1)  # one row: the names, shapes and dtypes
            for k, tensor in {"weight": weight, **state}.items():
                self.get((name, k), (rows, *tensor.shape[1:]), tensor.dtype).zero_()


def _shard_names(model):
    """(module path, file name, local shard) of every model-parallel shard this rank holds."""
    for path, sharded in model.sharded.items():
        for local in sharded.local_shards():
            s = local.shard
            yield path, f"{component(path)}/{component(local.table)}/r{s.row_offset}_c{s.col_offset}.pt", local




@torch.no_grad()
def take_snapshot(model, dense_optimizer, step: int, extra, kind: str, policy: SavePolicy, copy: bool = True,
                  buffers: Optional[SnapshotBuffers] = None) -> Snapshot:
    """This rank's part of a save of ``model`` at ``step`` (a collective in
    2D, where replicas join their touched rows). ``kind`` "base" saves every
    row; "delta" saves what ``policy`` selects. With ``copy`` every tensor
    is this snapshot's own (the writer runs while training changes the
    tables), copied into ``buffers`` (the caller's, reused across saves;
    fresh ones when None); without, live views where the storage gives them."""
    from dist_rec.checkpoint.checkpoint import _cpu_tensor, dense_state_dict

    buffers = buffers if buffers is not None else SnapshotBuffers()
    copy = copy or policy.quantises  # the base's copy is the quantised deltas' reference

    rank = dist.get_rank()
    grid = model.grid
    writes_shards = rank in grid.sharding_groups[0]
    snapshot = Snapshot(step, kind)
    for path, sharded in model.sharded.items():
        trackers = _join_replicas(sharded) if policy.tracks else None
        for index, local in enumerate(sharded.local_shards()):
            s = local.shard
            rect = (s.row_offset, s.num_rows, s.col_offset, s.num_cols)
            snapshot.rows_total += s.num_rows
            name = f"{component(path)}/{component(local.table)}/r{s.row_offset}_c{s.col_offset}.pt"
            if kind == "base":
                if trackers is not None and trackers[index] is not None:
                    trackers[index][2].saved(trackers[index][3])
                if not writes_shards:
                    continue
                weight, state = local.read()
                tensors = {"weight": weight, **state}
                if copy:
                    tensors = {k: buffers.copy((name, k), v) for k, v in tensors.items()}
                    if policy.quantises:
                        buffers.references[name] = tensors["weight"]
                else:
                    tensors = {k: _cpu_tensor(v) for k, v in tensors.items()}
                snapshot.items.append(Item(f"shards/{name}", "shard", tensors, path, local.table, rect, s.rank))
                snapshot.rows_saved += s.num_rows
            else:
                rows = _select_rows(trackers[index], policy, step, local.table, s)
                if trackers[index] is not None:
                    trackers[index][2].saved(trackers[index][3], rows)
                if not writes_shards:
                    continue
                weight, state = local.storage.read_rows(local.index, rows)
                tensors = {"rows": rows.cpu() + s.row_offset, "weight": weight.cpu(), **{k: v.cpu() for k, v in state.items()}}
                encode = functools.partial(_encode_delta, f"deltas/{name}", rect, policy.delta_bits, buffers.references.get(name))
                snapshot.items.append(Item(f"deltas/{name}", "delta", tensors, path, local.table, rect, s.rank, encode))
                snapshot.rows_saved += int(rows.numel())
        if rank == 0:
            for local in sharded.data_parallel_tables():
                weight, state = local.read()
                tensors = {"weight": weight.clone() if copy else _cpu_tensor(weight)}
                tensors.update({k: v.clone() if copy else _cpu_tensor(v) for k, v in state.items()})
                s = local.shard
                snapshot.items.append(Item(f"data_parallel/{component(path)}/{component(local.table)}.pt", "data_parallel",
                                           tensors, path, local.table, (0, s.num_rows, 0, s.num_cols), -1))  # fmt: skip
    optimizer_state = dense_optimizer.state_dict() if dense_optimizer is not None else None  # a collective for Shampoo
    if rank == 0:
        model_state = {k: v.detach().clone() if copy else _cpu_tensor(v) for k, v in dense_state_dict(model).items()}
        if copy and optimizer_state is not None:
            optimizer_state = _clone_tree(optimizer_state)
        snapshot.items.append(Item("dense.pt", "dense", {"model": model_state, "optimizer": optimizer_state, "extra": extra}))
    return snapshot


def _encode_delta(file: str, rect: tuple, bits: int, reference: Optional[torch.Tensor], tensors: Dict) -> Dict:
    """A delta's snapshot (global row ids, exact weights, state) as its file
    stores it (``delta.py``); moves a quantised delta's ``reference``."""
    local_rows = tensors["rows"] - rect[0]
    encoded = encode_rows(local_rows, rect[0], rect[1])
    encoded.update(encode_weights(tensors["weight"], bits, reference, local_rows, file))
    encoded.update({k: v for k, v in tensors.items() if k not in ("rows", "weight")})
    return encoded


def _join_replicas(sharded) -> List[Optional[tuple]]:
    """Per local shard (``local_shards`` order): (dirty bitmap, counts,
    tracker, table index), the bitmaps and counts joined over the replica
    group (2D); None for a lookup without a tracker."""
    group = sharded.replica_group
    out = []
    for lookup in sharded._lookups:
        tracker = lookup.tracker
        for t in range(lookup.storage.num_tables):
            if tracker is None:
                out.append(None)
                continue
            dirty, counts = tracker.dirty[t], tracker.counts[t] if tracker.counts is not None else None
            if group is not None and dist.get_world_size(group) > 1:
                joined = dirty.to(torch.uint8)
                dist.all_reduce(joined, op=dist.ReduceOp.MAX, group=group)
                dirty = joined.bool()
                if counts is not None:
                    counts = counts.clone()
                    dist.all_reduce(counts, group=group)
            out.append((dirty, counts, tracker, t))
    return out


def _select_rows(tracked, policy: SavePolicy, step: int, table: str, shard) -> torch.Tensor:
    """Local row ids (sorted) a delta of this shard saves."""
    if tracked is None:  # not tracked (a tracker was not attached): everything
        return torch.arange(shard.num_rows)
    dirty, counts = tracked[0], tracked[1]
    if policy.policy == "incremental":
        return dirty.nonzero().flatten()
    if policy.policy == "mfu":
        due = dirty.nonzero().flatten()
        top = max(1, math.ceil(policy.mfu_fraction * shard.num_rows))
        if due.numel() <= top:  # every due row fits
            return due
        return due[counts[due].topk(top, sorted=False).indices].sort().values
    if policy.policy == "ssu":
        ids = dirty.nonzero().flatten()
        seed = zlib.crc32(f"{policy.seed}/{step}/{table}/{shard.row_offset}".encode())  # the same in every process
        generator = torch.Generator().manual_seed(seed)
        keep = torch.rand(ids.numel(), generator=generator) < policy.ssu_fraction
        return ids[keep]
    raise ValueError(f"Invalid checkpoint policy {policy.policy!r}. Must be one of {POLICIES}.")


def _clone_tree(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone_tree(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone_tree(v) for v in value)
    return value


def attach_trackers(model, policy: SavePolicy) -> None:
    """Gives every model-parallel local lookup of ``model`` a ``RowTracker``
    (the policy's deltas need the rows touched, MFU the counts)."""
    if not policy.tracks:
        return
    for sharded in model.sharded.values():
        for lookup in sharded._lookups:
            lookup.tracker = RowTracker(lookup.storage, counts=policy.counts)


def shard_items_nbytes(items: Sequence[Item]) -> int:
    return sum(sum(t.numel() * t.element_size() for t in i.tensors.values()) for i in items if i.kind != "dense")
