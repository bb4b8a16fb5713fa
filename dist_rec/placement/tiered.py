"""``TieredStorage``: each table's hottest rows in memory, the rest on SSD.

RecShard's plan (``dist_rec.planner.recshard``) gives every table a number
of hot rows and an order of its rows, hottest first (from the access
statistics). Here a table's rows are renumbered in that order, so its hot
rows are the range ``[0, hot_rows)``: they live in memory (huge pages), the
rest in a ``ColdRowFile`` read and written with O_DIRECT, so the page cache
never serves as unaccounted fast memory. Callers keep the table's own ids:
the renumbering stays inside, and blocks (checkpoints, sync) come out in
the original row order.

A batch's rows are staged (``StagedStorage``): the unique rows it touches
are gathered into compact tables, the kernels run on those, and the fused
update writes the stepped rows back, so row-wise AdaGrad is exactly the
in-memory one. The cold part of a batch moves off the step's path:

* ``prefetch`` (called as soon as a batch's ids are known; the pipelined
  loop calls it a step ahead) starts reading the batch's cold blocks on a
  background thread;
* the update's cold rows are written back by another background thread,
  whole blocks, built from the blocks the batch read.

The rule that keeps this exact: a row stepped but not yet known to be in
every block read since (``_pending``) is served from memory. A row leaves
``_pending`` only once its write is done and every batch whose blocks are
still in use started reading after that write, so no stale copy of it can
be read or written back.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dist_rec.ops.embedding_bag import empty_hugepage
from dist_rec.placement.cold_file import ColdRowFile
from dist_rec.placement.in_memory import InMemoryStorage
from dist_rec.placement.location import EmbeddingLocation
from dist_rec.placement.memmap import _file_component
from dist_rec.placement.staged import StagedStorage
from dist_rec.placement.storage import Block, Layout, TableSpec, staged_ids

_INIT_CHUNK_ROWS = 1 << 18


class _Fetch:
    """The cold blocks of one batch: per table, sorted unique cold rows, the
    blocks holding them, and their contents (once read)."""

    def __init__(self, key, cold_rows: List[np.ndarray], seen_writes: int, staged=None) -> None:
        self.key = key
        self.cold_rows = cold_rows
        self.staged = staged  # the batch's staged_ids: computed once, used by its forward and update
        self.seen_writes = seen_writes  # write-backs complete when its reads began
        self.blocks: List[np.ndarray] = []
        self.data: List[np.ndarray] = []
        self.future: Optional[Future] = None

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()
            self.future = None


class TieredStorage(StagedStorage):
    """Tables split between memory (hot rows) and an SSD file (the rest).

    Args:
        tables, state_names, device: as ``EmbeddingStorage`` (CPU only).
        directory: where each table's cold-row file goes.
        hot_rows (Sequence[int]): per table, the rows kept in memory.
        row_orders (Sequence[Optional[array]]): per table, its row ids
            hottest first (``TableAccessStats.hot_order``); None keeps the
            table's own order (its first ``hot_rows`` rows are hot).
        threads (int): reads in flight on the SSD.
        create (bool): new cold files; False opens existing ones (checked).
    """

    location = EmbeddingLocation.SSD

    def __init__(
        self,
        tables: Sequence[TableSpec],
        state_names: Sequence[str],
        device: torch.device,
        directory,
        hot_rows: Sequence[int],
        row_orders: Optional[Sequence[Optional[np.ndarray]]] = None,
        threads: int = 8,
        create: bool = True,
    ) -> None:
        super().__init__(tables, state_names, device)
        if self.device.type != "cpu":
            raise NotImplementedError(f"TieredStorage serves CPU ranks; got device {self.device}.")
        if len(hot_rows) != len(self.tables):
            raise ValueError(f"Invalid hot_rows: {len(hot_rows)} values for {len(self.tables)} tables.")
        row_orders = list(row_orders) if row_orders is not None else [None] * len(self.tables)
        self.directory = Path(directory)
        self.hot_rows: List[int] = []
        # Original id -> position hottest first (int32 below 2^31 rows: it is memory every row costs).
        self._new_id: List[Optional[torch.Tensor]] = []
        self._hot_weights: List[torch.Tensor] = []
        self._hot_states: List[Dict[str, torch.Tensor]] = []
        self._files: List[Optional[ColdRowFile]] = []
        for spec, hot, order in zip(self.tables, hot_rows, row_orders):
            if spec.dtype != torch.float32:
                raise NotImplementedError(f"TieredStorage: table {spec.name!r} is {spec.dtype}; tiered tables hold float32.")
            if not 0 <= int(hot) <= spec.num_rows:
                raise ValueError(f"Invalid hot_rows={hot} for table {spec.name!r} with {spec.num_rows} rows.")
            self.hot_rows.append(int(hot))
            self._set_order(spec, order)
            self._hot_weights.append(empty_hugepage((int(hot), spec.dim), torch.float32).zero_())
            self._hot_states.append({n: torch.zeros(int(hot)) for n in self.state_names})
            cold = spec.num_rows - int(hot)
            path = self.directory / f"{_file_component(spec.name)}.cold"
            self._files.append(
                ColdRowFile(path, spec.name, cold, spec.dim, len(self.state_names), create=create, threads=threads)
                if cold
                else None
            )
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist_rec-tier-fetch")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist_rec-tier-writeback")
        self._lock = threading.Lock()
        self._writes_queued = 0
        self._writes_done = 0
        self._write_error: Optional[BaseException] = None
        self._pending: List[Dict[int, Tuple[int, np.ndarray]]] = [dict() for _ in self.tables]  # row -> (write no., record)
        self._fetches: Deque[_Fetch] = deque()
        self._current: Optional[_Fetch] = None  # the batch between its forward and its update
        self.cold_row_reads = 0  # unique cold rows of the batches looked up (counted, for benchmarks)

    def _set_order(self, spec: TableSpec, order) -> None:
        if order is None:
            self._new_id.append(None)
            return
        old = torch.as_tensor(np.asarray(order), dtype=torch.int64)
        in_range = old.shape == (spec.num_rows,) and (spec.num_rows == 0 or (int(old.min()) >= 0 and int(old.max()) < spec.num_rows))
        if not in_range or not bool((torch.bincount(old, minlength=spec.num_rows) == 1).all()):
            raise ValueError(f"Invalid row order for table {spec.name!r}: must be a permutation of its {spec.num_rows} rows.")
        dtype = torch.int32 if spec.num_rows < 2**31 else torch.int64
        new = torch.empty(spec.num_rows, dtype=dtype)
        new[old] = torch.arange(spec.num_rows, dtype=dtype)
        self._new_id.append(new)

    # -- ids ---------------------------------------------------------------------------

    def _positions(self, table: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows' positions hottest first (hot: ``< hot_rows``)."""
        new = self._new_id[table]
        ids = ids.to(torch.int64)
        return ids if new is None else new.index_select(0, ids).to(torch.int64)

    def _cold_rows(self, layout: Layout, indices_N, offsets):
        """``(per table the batch's sorted unique cold rows, its staged_ids)``."""
        staged = staged_ids(layout, indices_N, offsets, self.tables)
        cold = []
        for t, ids in enumerate(staged[0]):
            positions = self._positions(t, ids)
            rows = positions[positions >= self.hot_rows[t]] - self.hot_rows[t]
            cold.append(np.unique(rows.numpy()))
        return cold, staged

    def _staged_ids(self, layout: Layout, indices_N, offsets):
        return self._fetch_for(layout, indices_N, offsets).staged

    # -- the cold tier's background work --------------------------------------------------

    def _check_writer(self) -> None:
        if self._write_error is not None:
            raise RuntimeError(f"TieredStorage: a write-back of cold rows to {self.directory} failed") from self._write_error

    def _start_fetch(self, key, cold_and_staged) -> _Fetch:
        cold_rows, staged = cold_and_staged
        with self._lock:
            fetch = _Fetch(key, cold_rows, self._writes_done, staged)
        self.cold_row_reads += sum(len(rows) for rows in cold_rows)
        for t, rows in enumerate(cold_rows):
            file = self._files[t]
            fetch.blocks.append(file.unique_blocks(rows) if file is not None and len(rows) else np.zeros(0, np.int64))

        def read() -> None:
            for t, blocks in enumerate(fetch.blocks):
                file = self._files[t]
                fetch.data.append(file.read_blocks(blocks) if file is not None else np.zeros(0, np.uint8))

        fetch.future = self._reader.submit(read)
        return fetch

    def prefetch(self, layout: Layout, indices_N, offsets) -> None:
        """Starts reading the batch's cold blocks in the background."""
        self._check_writer()
        self._fetches.append(self._start_fetch(_batch_key(indices_N, offsets), self._cold_rows(layout, indices_N, offsets)))

    def _fetch_for(self, layout: Layout, indices_N, offsets) -> _Fetch:
        """The batch's fetch: the prefetched one, or one read now."""
        key = _batch_key(indices_N, offsets)
        if self._current is not None and self._current.key == key:
            return self._current
        while self._fetches and self._fetches[0].key != key:
            self._fetches.popleft().wait()  # a batch prefetched but never looked up
        fetch = self._fetches.popleft() if self._fetches else self._start_fetch(key, self._cold_rows(layout, indices_N, offsets))
        fetch.wait()
        self._current = fetch
        self._retire()
        return fetch

    def _retire(self) -> None:
        """Drops pending rows whose write is done and seen by every live fetch."""
        with self._lock:
            done = self._writes_done
        live = [f.seen_writes for f in self._fetches] + ([self._current.seen_writes] if self._current is not None else [])
        horizon = min([done] + live)
        for pending in self._pending:
            stale = [row for row, (number, _) in pending.items() if number <= horizon]
            for row in stale:
                del pending[row]

    def _write_back(self, fetch: _Fetch, table: int, rows: np.ndarray, records: np.ndarray) -> None:
        """Queues the blocks holding ``rows`` (this batch's stepped cold rows)
        with their new records and every pending row they hold."""
        file = self._files[table]
        with self._lock:
            self._writes_queued += 1
            number = self._writes_queued
        pending = self._pending[table]
        for row, record in zip(rows.tolist(), records):
            pending[row] = (number, record)
        blocks = file.unique_blocks(rows)
        # The fetch read these blocks; copy them, then lay the newest value of every pending row over.
        source_blocks, source = fetch.blocks[table], fetch.data[table]
        index = np.searchsorted(source_blocks, blocks)
        data = np.frombuffer(_aligned_copy(source, index), dtype=np.uint8)
        pending_rows = np.fromiter(pending.keys(), dtype=np.int64, count=len(pending))
        inside = pending_rows[np.isin(file.blocks_of(pending_rows), blocks)]  # includes this batch's rows
        if len(inside):
            file.patch(blocks, data, inside, np.stack([pending[r][1] for r in inside.tolist()]))

        def write() -> None:
            try:
                file.write_blocks(blocks, data)
            except BaseException as error:  # noqa: BLE001 -- raised on the training thread at the next call
                self._write_error = error
                raise
            with self._lock:
                self._writes_done = number

        self._writer.submit(write)

    def flush(self) -> None:
        """Waits for every write-back (a save, the end of a run)."""
        self._writer.submit(lambda: None).result()
        self._check_writer()
        self._retire()

    def close(self) -> None:
        self.flush()
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        for file in self._files:
            if file is not None:
                file.close()

    # -- staged lookups: rows by id ----------------------------------------------------

    def forward(self, layout: Layout, indices_N, offsets, per_sample_weights_N) -> torch.Tensor:
        self._check_writer()
        self._fetch_for(layout, indices_N, offsets)
        return super().forward(layout, indices_N, offsets, per_sample_weights_N)

    def fused_update(self, optimizer, layout: Layout, indices_N, offsets, per_sample_weights_N, grad_output_BD) -> None:
        self._check_writer()
        fetch = self._fetch_for(layout, indices_N, offsets)
        unique, remapped, weights, states = self._stage(layout, indices_N, offsets, with_state=True)
        optimizer.backward_(weights, states, layout, remapped, offsets, per_sample_weights_N, grad_output_BD)
        for t, ids in enumerate(unique):
            if ids.numel():
                self._write_rows(t, ids, weights[t], states[t], fetch)
        self._current = None  # its blocks are written back; the batch is done

    def row_grads(self, layout: Layout, indices_N, offsets, per_sample_weights_N, grad_output_BD):
        self._fetch_for(layout, indices_N, offsets)
        return super().row_grads(layout, indices_N, offsets, per_sample_weights_N, grad_output_BD)

    def per_sample_weights_grad(self, layout: Layout, indices_N, offsets, grad_output_BD) -> torch.Tensor:
        self._fetch_for(layout, indices_N, offsets)
        return super().per_sample_weights_grad(layout, indices_N, offsets, grad_output_BD)

    def read_rows(self, table: int, ids_U: torch.Tensor) -> Block:
        """Copies of rows ``ids_U`` (original ids); cold ones from the
        current batch's blocks, or read now, the newest pending value first."""
        spec, hot = self.tables[table], self.hot_rows[table]
        positions = self._positions(table, ids_U)
        weight = torch.empty(len(positions), spec.dim)
        state = {n: torch.empty(len(positions)) for n in self.state_names}
        is_hot = positions < hot
        hot_at = is_hot.nonzero().squeeze(1)
        if hot_at.numel():
            hot_positions = positions.index_select(0, hot_at)
            weight.index_copy_(0, hot_at, self._hot_weights[table].index_select(0, hot_positions))
            for n in self.state_names:
                state[n].index_copy_(0, hot_at, self._hot_states[table][n].index_select(0, hot_positions))
        cold_at = (~is_hot).nonzero().squeeze(1)
        if cold_at.numel():
            rows = (positions.index_select(0, cold_at) - hot).numpy()
            records = torch.from_numpy(self._cold_records(table, rows))
            weight.index_copy_(0, cold_at, records[:, : spec.dim])
            for i, n in enumerate(self.state_names):
                state[n].index_copy_(0, cold_at, records[:, spec.dim + i].contiguous())
        return weight, state

    def _cold_records(self, table: int, rows: np.ndarray) -> np.ndarray:
        file, fetch = self._files[table], self._current
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        if fetch is not None and len(fetch.blocks[table]) and np.isin(file.blocks_of(sorted_rows), fetch.blocks[table]).all():
            blocks, data = fetch.blocks[table], fetch.data[table]
        else:
            blocks = file.unique_blocks(sorted_rows)
            data = file.read_blocks(blocks)
        records = np.empty((len(rows), file.record_floats), dtype=np.float32)
        records[order] = file.records(blocks, data, sorted_rows)
        pending = self._pending[table]
        if pending:
            for i, row in enumerate(rows.tolist()):
                entry = pending.get(row)
                if entry is not None:
                    records[i] = entry[1]
        return records

    def _write_rows(self, table: int, ids_U, weight_UD, state, fetch: Optional[_Fetch]) -> None:
        spec, hot = self.tables[table], self.hot_rows[table]
        positions = self._positions(table, ids_U)
        is_hot = positions < hot
        hot_at = is_hot.nonzero().squeeze(1)
        with torch.no_grad():
            if hot_at.numel():
                hot_positions = positions.index_select(0, hot_at)
                if weight_UD is not None:
                    self._hot_weights[table].index_copy_(0, hot_positions, weight_UD.index_select(0, hot_at).to(torch.float32))
                for n, values in (state or {}).items():
                    self._hot_states[table][n].index_copy_(0, hot_positions, values.index_select(0, hot_at))
        cold_at = (~is_hot).nonzero().squeeze(1)
        if not cold_at.numel():
            return
        rows = (positions.index_select(0, cold_at) - hot).numpy()
        records = self._cold_records(table, rows) if weight_UD is None or len(state or {}) < len(self.state_names) else None
        if records is None:
            records = np.empty((len(rows), spec.dim + len(self.state_names)), dtype=np.float32)
        if weight_UD is not None:
            records[:, : spec.dim] = weight_UD.index_select(0, cold_at).to(torch.float32).numpy()
        for i, n in enumerate(self.state_names):
            if n in (state or {}):
                records[:, spec.dim + i] = state[n].index_select(0, cold_at).numpy()
        order = np.argsort(rows, kind="stable")
        rows, records = rows[order], records[order]
        file = self._files[table]
        if fetch is None or not np.isin(file.blocks_of(rows), fetch.blocks[table]).all():
            blocks = file.unique_blocks(rows)
            self.flush()  # the blocks read now must hold every earlier write
            fetch = _Fetch(None, [], self._writes_done)
            fetch.blocks = [np.zeros(0, np.int64)] * len(self.tables)
            fetch.data = [np.zeros(0, np.uint8)] * len(self.tables)
            fetch.blocks[table], fetch.data[table] = blocks, file.read_blocks(blocks)
        self._write_back(fetch, table, rows, records)

    def write_rows(self, table: int, ids_U, weight_UD=None, state=None) -> None:
        self._write_rows(table, ids_U, weight_UD, state, None)

    # -- blocks in the original order: initialisation, sync, checkpoints -------------------

    def read_block(self, table: int, start: int = 0, count: Optional[int] = None) -> Block:
        count = self.tables[table].num_rows - start if count is None else count
        self._check_block(table, start, count)
        return self.read_rows(table, torch.arange(start, start + count))

    def write_block(self, table: int, start: int, weight=None, state=None) -> None:
        count = weight.shape[0] if weight is not None else next(iter((state or {}).values())).shape[0]
        self._check_block(table, start, count)
        self.write_rows(table, torch.arange(start, start + count), weight, state)
        self.flush()

    def reset_(self, init_ranges) -> None:
        """Uniform rows, zero state, drawn in the hottest-first order a chunk
        at a time (a table larger than memory never exists whole in it)."""
        self.flush()
        self._fetches.clear()
        self._current = None
        for t, (low, high) in enumerate(init_ranges):
            spec, hot = self.tables[t], self.hot_rows[t]
            self._pending[t].clear()
            with torch.no_grad():
                self._hot_weights[t].uniform_(low, high)
                for tensor in self._hot_states[t].values():
                    tensor.zero_()
            file = self._files[t]
            if file is None:
                continue
            chunk = max(file.per_block, _INIT_CHUNK_ROWS // file.per_block * file.per_block)
            for first in range(0, file.num_rows, chunk):
                n = min(chunk, file.num_rows - first)
                records = np.zeros((n, file.record_floats), dtype=np.float32)
                records[:, : spec.dim] = torch.empty(n, spec.dim).uniform_(low, high).numpy()
                file.write_sequential(first, records)

    def reset_state_(self) -> None:
        for t in range(len(self.tables)):
            spec = self.tables[t]
            zeros = {n: torch.zeros(spec.num_rows) for n in self.state_names}
            self.write_block(t, 0, None, zeros)

    def cold_blocks_read(self) -> int:
        return sum(f.reads for f in self._files if f is not None)


class _batch_key:
    """Names a batch's lookup: its id and offset tensors themselves (held
    weakly: a freed tensor's memory may hold the next batch's ids)."""

    def __init__(self, indices_N: torch.Tensor, offsets: torch.Tensor) -> None:
        self._indices, self._offsets = weakref.ref(indices_N), weakref.ref(offsets)

    def __eq__(self, other) -> bool:
        if not isinstance(other, _batch_key):
            return False
        mine = (self._indices(), self._offsets())
        return None not in mine and mine[0] is other._indices() and mine[1] is other._offsets()

    __hash__ = None


def _aligned_copy(source: np.ndarray, block_index: np.ndarray):
    from dist_rec.placement.cold_file import BLOCK_BYTES, _aligned

    buffer = _aligned(len(block_index) * BLOCK_BYTES)
    target = np.frombuffer(buffer, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    if len(block_index):
        target[:] = source.reshape(-1, BLOCK_BYTES)[block_index]
    return buffer


def tier_report(storages: Sequence, steps: int) -> Optional[Dict]:
    """What the tiered storages among ``storages`` (one rank's) held and
    moved: rows in memory and on SSD, bytes of hot rows, and per step the
    cold blocks read and written and cold rows served; None without any."""
    tiered = [s for s in storages if isinstance(s, TieredStorage)]
    if not tiered:
        return None
    # Rows in memory: the tiered tables' hot rows and every row of the other storages.
    per_table = [(h, t, len(s.state_names)) for s in tiered for h, t in zip(s.hot_rows, s.tables)]
    per_table += [(t.num_rows, t, len(s.state_names)) for s in storages if isinstance(s, InMemoryStorage) for t in s.tables]
    hot = sum(h for h, _, _ in per_table)
    rows = sum(t.num_rows for _, t, _ in per_table)
    hot_bytes = sum(h * (t.dim * t.dtype.itemsize + 4 * states) for h, t, states in per_table)
    files = [f for s in tiered for f in s._files if f is not None]
    steps = max(1, steps)
    return {
        "hot_rows": hot,
        "rows": rows,
        "hot_bytes": hot_bytes,
        "cold_blocks_read_per_step": sum(f.reads for f in files) / steps,
        "cold_blocks_written_per_step": sum(f.writes for f in files) / steps,
        "cold_rows_per_step": sum(s.cold_row_reads for s in tiered) / steps,
    }
