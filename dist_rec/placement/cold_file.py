"""``ColdRowFile``: one table's cold rows (weights and row-wise state) in a
file read and written with ``O_DIRECT``.

Why O_DIRECT: a file read through the page cache stays in DRAM after its
first read, so a "slow tier" would quietly become fast memory that no
budget accounts for (and a benchmark would measure DRAM). With O_DIRECT
every read goes to the device and the only DRAM the cold tier uses is our
own buffers, sized by the batch.

Layout: a 4 KiB header block (magic, then JSON naming the table, its rows,
width and states), then the rows as records of ``dim + states`` float32
values. Records never straddle a block: ``per_block`` of them fill a block
(the rest of it is padding), or a record takes whole blocks when it is
larger than one. A random row read therefore moves one block (or its own
blocks), the SSD's unit.

Reads and writes are whole aligned blocks into page-aligned buffers
(anonymous ``mmap``); neighbouring blocks are merged into one call;
``threads`` calls run at once (``os.preadv`` / ``os.pwritev`` release the
GIL), as the SSD needs several reads in flight to reach its rate.
"""

from __future__ import annotations

import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

BLOCK_BYTES = 4096
MAGIC = b"DIST_REC_COLD_ROWS_V1\n"
MAX_RUN_BLOCKS = 64  # blocks one call moves at most
DEFAULT_THREADS = 8


class ColdFileError(ValueError):
    """A tier file that is missing, truncated or not the table's."""


class ColdRowFile:
    """The cold rows of table ``table``: ``num_rows`` records of ``dim``
    weights and ``num_states`` state values (float32).

    ``create=True`` makes a new file (an existing one is replaced);
    ``create=False`` opens one and refuses it, naming the table and the
    file, when it is missing, truncated or describes another table.
    """

    def __init__(
        self, path, table: str, num_rows: int, dim: int, num_states: int, create: bool = True, threads: int = DEFAULT_THREADS
    ) -> None:
        self.path = Path(path)
        self.table, self.num_rows, self.dim, self.num_states = table, int(num_rows), int(dim), int(num_states)
        self.record_floats = self.dim + self.num_states
        record_bytes = 4 * self.record_floats
        if record_bytes <= BLOCK_BYTES:
            self.per_block, self.blocks_per_record = BLOCK_BYTES // record_bytes, 1
        else:
            self.per_block, self.blocks_per_record = 1, -(-record_bytes // BLOCK_BYTES)
        self.num_blocks = -(-self.num_rows // self.per_block) * self.blocks_per_record
        self.file_bytes = BLOCK_BYTES * (1 + self.num_blocks)
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="dist_rec-cold-io")
        self.threads = max(1, threads)
        self.reads = 0  # blocks read (counted, for benchmarks)
        self.writes = 0  # blocks written back after updates (initialisation not counted)
        if create:
            self._create()
        else:
            self._check_existing()
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        except OSError as e:
            raise ColdFileError(
                f"Cannot open the cold rows of table {table!r} at {self.path} with O_DIRECT ({e.strerror}): put the "
                "tier directory on a filesystem that bypasses the page cache (an SSD, not tmpfs)."
            ) from None

    # -- the file ------------------------------------------------------------------

    def _header(self) -> bytes:
        meta = {"table": self.table, "num_rows": self.num_rows, "dim": self.dim, "num_states": self.num_states,
                "per_block": self.per_block, "blocks_per_record": self.blocks_per_record}  # fmt: skip
        text = MAGIC + json.dumps(meta, sort_keys=True).encode() + b"\n"
        if len(text) > BLOCK_BYTES:
            raise ValueError(f"Table name {self.table!r} is too long for a cold-row file header.")
        return text.ljust(BLOCK_BYTES, b"\0")

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:
            f.write(self._header())
            f.truncate(self.file_bytes)  # sparse: zeros until written

    def _check_existing(self) -> None:
        where = f"the cold rows of table {self.table!r} ({self.path})"
        if not self.path.is_file():
            raise ColdFileError(f"Missing tier file: {where} does not exist.")
        with open(self.path, "rb") as f:
            head = f.read(BLOCK_BYTES)
        if not head.startswith(MAGIC):
            raise ColdFileError(f"Foreign tier file: {where} is not a dist_rec cold-row file.")
        try:
            meta = json.loads(head[len(MAGIC) :].split(b"\n", 1)[0])
        except ValueError:
            raise ColdFileError(f"Foreign tier file: {where} has an unreadable header.") from None
        expected = json.loads(self._header()[len(MAGIC) :].split(b"\n", 1)[0])
        if meta != expected:
            raise ColdFileError(f"Foreign tier file: {where} holds {meta}; this table needs {expected}.")
        size = self.path.stat().st_size
        if size < self.file_bytes:
            raise ColdFileError(f"Truncated tier file: {where} has {size} bytes; {self.file_bytes} expected.")

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        self._pool.shutdown(wait=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter teardown
            pass

    # -- where a row is ------------------------------------------------------------

    def blocks_of(self, rows: np.ndarray) -> np.ndarray:
        """The first block (0 = the first after the header) of each row's record."""
        return (rows // self.per_block) * self.blocks_per_record

    def unique_blocks(self, rows: np.ndarray) -> np.ndarray:
        """Sorted blocks holding ``rows`` (all blocks of records larger than one)."""
        first = np.unique(self.blocks_of(rows))
        if self.blocks_per_record == 1:
            return first
        return (first[:, None] + np.arange(self.blocks_per_record)).reshape(-1)

    def records(self, blocks: np.ndarray, data: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Views of ``rows``' records inside ``data`` (``blocks`` read into
        it, in order): float32 ``[len(rows), dim + num_states]`` (a copy)."""
        position = np.searchsorted(blocks, self.blocks_of(rows))
        start = position * BLOCK_BYTES // 4 + (rows % self.per_block) * self.record_floats
        floats = data.view(np.float32)
        return floats[start[:, None] + np.arange(self.record_floats)]

    def patch(self, blocks: np.ndarray, data: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
        """Writes ``values`` as ``rows``' records into ``data`` (``blocks``' contents)."""
        position = np.searchsorted(blocks, self.blocks_of(rows))
        start = position * BLOCK_BYTES // 4 + (rows % self.per_block) * self.record_floats
        floats = data.view(np.float32)
        floats[start[:, None] + np.arange(self.record_floats)] = values

    # -- I/O -------------------------------------------------------------------------

    def read_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """The contents of sorted unique ``blocks``: uint8 ``[len * 4096]``,
        page-aligned (read with O_DIRECT, threads in parallel)."""
        buffer = _aligned(len(blocks) * BLOCK_BYTES)
        self._run_io(blocks, buffer, write=False)
        self.reads += len(blocks)
        return np.frombuffer(buffer, dtype=np.uint8)

    def write_blocks(self, blocks: np.ndarray, data: np.ndarray, count: bool = True) -> None:
        """Writes ``data`` (aligned, as ``read_blocks`` returns) as ``blocks``
        (counted in ``writes`` unless ``count`` is False: initialisation)."""
        self._run_io(blocks, data, write=True)
        if count:
            self.writes += len(blocks)

    def _run_io(self, blocks: np.ndarray, buffer, write: bool) -> None:
        if len(blocks) == 0:
            return
        view = memoryview(buffer).cast("B")
        runs = _runs(blocks)
        call = os.pwritev if write else os.preadv
        fd = self._fd

        def move(chunk: List[Tuple[int, int, int]]) -> None:
            for first_index, first_block, count in chunk:
                piece = view[first_index * BLOCK_BYTES : (first_index + count) * BLOCK_BYTES]
                done = call(fd, [piece], BLOCK_BYTES * (1 + first_block))
                if done != len(piece):
                    raise OSError(f"{'Wrote' if write else 'Read'} {done} of {len(piece)} bytes at block {first_block} of {self.path}.")

        if len(runs) == 1 or self.threads == 1:
            move(runs)
            return
        chunks = [runs[i :: self.threads] for i in range(min(self.threads, len(runs)))]
        for future in [self._pool.submit(move, c) for c in chunks]:
            future.result()

    def write_sequential(self, first_row: int, values: np.ndarray) -> None:
        """Records of rows ``first_row ..`` from ``values`` (float32
        ``[n, dim + num_states]``), ``first_row`` on a block boundary:
        initialisation, a whole table at a time."""
        if first_row % self.per_block:
            raise ValueError(f"first_row={first_row} must start a block ({self.per_block} rows per block).")
        if self.blocks_per_record == 1:  # whole blocks laid out at once (no per-record indexing)
            count = -(-len(values) // self.per_block)
            buffer = _aligned(count * BLOCK_BYTES)
            blocks_view = np.frombuffer(buffer, dtype=np.float32)[: count * BLOCK_BYTES // 4].reshape(count, BLOCK_BYTES // 4)
            padded = np.zeros((count * self.per_block, self.record_floats), dtype=np.float32)
            padded[: len(values)] = values
            blocks_view[:, : self.per_block * self.record_floats] = padded.reshape(count, -1)
            first_block = first_row // self.per_block
            self.write_blocks(np.arange(first_block, first_block + count), np.frombuffer(buffer, dtype=np.uint8), count=False)
            return
        rows = np.arange(first_row, first_row + len(values))
        blocks = self.unique_blocks(rows)
        data = np.frombuffer(_aligned(len(blocks) * BLOCK_BYTES), dtype=np.uint8)
        self.patch(blocks, data, rows, values)
        self.write_blocks(blocks, data, count=False)


def _aligned(size: int):
    return mmap.mmap(-1, max(size, mmap.PAGESIZE))


def _runs(blocks: np.ndarray) -> List[Tuple[int, int, int]]:
    """``(index into blocks, first block, count)`` of each run of
    consecutive blocks, at most ``MAX_RUN_BLOCKS`` long."""
    if len(blocks) == 0:
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(blocks)]])
    runs = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        for a in range(s, e, MAX_RUN_BLOCKS):
            runs.append((a, int(blocks[a]), min(MAX_RUN_BLOCKS, e - a)))
    return runs
