"""Memory tiers as the RecShard planner sees them: how much each holds per
rank and how fast it serves random rows.

A tier is named by the ``EmbeddingLocation`` its rows would have in a plan:
``device`` (the rank's own memory: HBM on a GPU rank, DRAM on a CPU rank),
``host`` (host DRAM) and ``ssd`` (local flash). Embedding lookups read rows
at random, so what matters is not a tier's sequential bandwidth but the rate
of random row reads; every read moves at least ``read_granularity_bytes``
(a cache line from DRAM, a 4 KiB block from an SSD read with O_DIRECT),
which is why small rows cost an SSD far more than their size suggests.

``TierModel.calibrate`` measures the rates on this machine in a few seconds:

* DRAM: ``torch.index_select`` of random rows from a buffer several times
  the last-level cache (so rows come from memory, not cache);
* SSD: random block reads of a temporary file opened with ``O_DIRECT`` into
  page-aligned buffers (``os.preadv``), at queue depth 1 and with several
  threads in flight. ``O_DIRECT`` bypasses the page cache: without it the
  file would be read from DRAM after the first pass and the SSD would look
  as fast as memory.

The result is plain JSON; ``TierModel.load_or_calibrate(path)`` reuses it.

    python -m dist_rec.planner.tiers --dir /mnt/ssd --out runs/tiers.json
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from dist_rec.placement.location import EmbeddingLocation

# Smallest read each tier serves: a 64-byte cache line from memory, a 4 KiB
# block from an SSD (O_DIRECT reads are whole, aligned blocks).
CACHE_LINE_BYTES = 64
SSD_BLOCK_BYTES = 4096

DEFAULT_ROW_BYTES = 256  # 64 float32 columns
DEFAULT_CALIBRATION_SECONDS = 3.0
DEFAULT_FILE_BYTES = 1 << 30  # large: a small file is served from a VM host's cache even under O_DIRECT
DEFAULT_SSD_THREADS = 8

# When the last-level cache size cannot be read, assume a large server L3.
_FALLBACK_LLC_BYTES = 64 << 20


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


@dataclass
class Tier:
    """One memory tier, per rank.

    Args:
        name (str): an ``EmbeddingLocation`` value: "device", "host" or "ssd".
        capacity_bytes (int): bytes of rows (and their optimizer state) one
            rank may keep in this tier.
        row_read_bytes_per_s (float): bytes per second that random row reads
            move, each read rounded up to ``read_granularity_bytes``.
        read_granularity_bytes (int): the smallest read the tier serves.
            (Default: 64, a cache line)
        details (Dict): what calibration measured (rates, queue depths).
    """

    name: str
    capacity_bytes: int
    row_read_bytes_per_s: float
    read_granularity_bytes: int = CACHE_LINE_BYTES
    details: Dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = EmbeddingLocation.from_str(self.name, "for a tier").value
        if isinstance(self.capacity_bytes, bool) or not isinstance(self.capacity_bytes, int) or self.capacity_bytes < 0:
            raise ValueError(f"Invalid capacity_bytes={self.capacity_bytes!r} for tier {self.name!r}. Must be an int >= 0.")
        if not (isinstance(self.row_read_bytes_per_s, (int, float)) and self.row_read_bytes_per_s > 0):
            raise ValueError(
                f"Invalid row_read_bytes_per_s={self.row_read_bytes_per_s!r} for tier {self.name!r}. Must be > 0."
            )
        if self.read_granularity_bytes < 1:
            raise ValueError(
                f"Invalid read_granularity_bytes={self.read_granularity_bytes!r} for tier {self.name!r}. Must be >= 1."
            )

    @property
    def location(self) -> EmbeddingLocation:
        return EmbeddingLocation(self.name)

    def seconds_per_row(self, row_bytes: int) -> float:
        """Expected time of one random read of a row of ``row_bytes``."""
        return round_up(row_bytes, self.read_granularity_bytes) / self.row_read_bytes_per_s

    def rows_per_s(self, row_bytes: int) -> float:
        return 1.0 / self.seconds_per_row(row_bytes)

    def to_dict(self) -> Dict:
        return {
            "name": self.name,
            "capacity_bytes": self.capacity_bytes,
            "row_read_bytes_per_s": self.row_read_bytes_per_s,
            "read_granularity_bytes": self.read_granularity_bytes,
            "details": dict(self.details),
        }


@dataclass
class TierModel:
    """The tiers a rank has, fastest first.

    Args:
        tiers (List[Tier]): distinct names, fastest first.
        compute_device (str): "cpu" or "cuda": on a CPU rank "device" and
            "host" are the same DRAM. (Default: "cpu")
        calibration (Dict): how the rates were measured, when they were.

    Example::

        model = TierModel.load_or_calibrate("runs/tiers.json", directory="/mnt/ssd")
        model = model.with_capacities(device=2 << 30, ssd=64 << 30)   # this job's budgets
        model.tier("ssd").rows_per_s(256)
    """

    tiers: List[Tier]
    compute_device: str = "cpu"
    calibration: Dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tiers]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"Invalid tiers {names}. Must be a non-empty list of distinct tier names.")
        if self.compute_device not in ("cpu", "cuda"):
            raise ValueError(f"Invalid compute_device={self.compute_device!r}. Must be 'cpu' or 'cuda'.")

    @property
    def names(self) -> List[str]:
        return [t.name for t in self.tiers]

    def tier(self, name: Union[str, EmbeddingLocation]) -> Tier:
        name = EmbeddingLocation.from_str(name, "for a tier").value
        for t in self.tiers:
            if t.name == name:
                return t
        raise ValueError(f"Invalid tier {name!r}. This tier model has {self.names}.")

    def with_capacities(self, **capacity_bytes: int) -> "TierModel":
        """A copy with the given tiers' per-rank capacities replaced, e.g.
        ``with_capacities(device=2 << 30, ssd=64 << 30)``."""
        for name in capacity_bytes:
            self.tier(name)
        tiers = [replace(t, capacity_bytes=int(capacity_bytes.get(t.name, t.capacity_bytes))) for t in self.tiers]
        return TierModel(tiers, self.compute_device, dict(self.calibration))

    # -- plain data ------------------------------------------------------------

    def to_dict(self) -> Dict:
        return {
            "compute_device": self.compute_device,
            "tiers": [t.to_dict() for t in self.tiers],
            "calibration": dict(self.calibration),
        }

    @classmethod
    def from_dict(cls, data: Dict) -> "TierModel":
        try:
            tiers = [
                Tier(
                    name=t["name"],
                    capacity_bytes=int(t["capacity_bytes"]),
                    row_read_bytes_per_s=float(t["row_read_bytes_per_s"]),
                    read_granularity_bytes=int(t.get("read_granularity_bytes", CACHE_LINE_BYTES)),
                    details=dict(t.get("details", {})),
                )
                for t in data["tiers"]
            ]
            return cls(tiers, data.get("compute_device", "cpu"), dict(data.get("calibration", {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f"Not a tier model: {type(e).__name__} {e}.") from None

    def save(self, path: Union[str, Path]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TierModel":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON tier model ({e}).") from None
        return cls.from_dict(data)

    def __str__(self) -> str:
        from dist_rec.planner.cost import format_bytes

        row_bytes = int(self.calibration.get("row_bytes", DEFAULT_ROW_BYTES))
        rows = [("tier", "capacity / rank", "random-row bandwidth", f"rows/s ({row_bytes} B rows)")]
        for t in self.tiers:
            rows.append(
                (
                    t.name,
                    format_bytes(t.capacity_bytes),
                    f"{t.row_read_bytes_per_s / 1e9:.3g} GB/s",
                    f"{t.rows_per_s(row_bytes):.3g}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return f"Tier model ({self.compute_device})\n" + "\n".join(lines)

    # -- measurement -------------------------------------------------------------

    @classmethod
    def calibrate(
        cls,
        directory: Union[str, Path],
        row_bytes: int = DEFAULT_ROW_BYTES,
        seconds: float = DEFAULT_CALIBRATION_SECONDS,
        file_bytes: int = DEFAULT_FILE_BYTES,
        ssd_threads: int = DEFAULT_SSD_THREADS,
        ranks_per_host: int = 1,
        compute_device: str = "cpu",
    ) -> "TierModel":
        """Measures this machine's tiers in about ``seconds`` (plus writing
        the temporary file).

        Args:
            directory (str): a directory on the SSD to measure; a temporary
                file of ``file_bytes`` is written there and deleted after.
            row_bytes (int): row size of the DRAM measurement. (Default: 256)
            seconds (float): time spent measuring, split over DRAM, SSD at
                queue depth 1 and SSD with ``ssd_threads`` reads in flight.
            file_bytes (int): size of the temporary file. (Default: 1 GiB)
            ssd_threads (int): threads issuing SSD reads at once. (Default: 8)
            ranks_per_host (int): ranks sharing the host's memory and disk;
                capacities are the host's divided by it. (Default: 1)
            compute_device (str): "cuda" measures the "device" tier as the
                GPU's memory. (Default: "cpu")

        Capacities are the hardware's (physical memory, free disk space,
        GPU memory); give a job's budgets with ``with_capacities``.

        Raises:
            ValueError: ``directory`` is on a filesystem without O_DIRECT
                (e.g. tmpfs), or invalid arguments.
        """
        if row_bytes < 1 or seconds <= 0 or ssd_threads < 1 or ranks_per_host < 1:
            raise ValueError(
                f"Invalid calibration row_bytes={row_bytes}, seconds={seconds}, ssd_threads={ssd_threads}, "
                f"ranks_per_host={ranks_per_host}. Must be >= 1, > 0, >= 1, >= 1."
            )
        if file_bytes < 16 * SSD_BLOCK_BYTES:
            raise ValueError(f"Invalid file_bytes={file_bytes}. Must be >= {16 * SSD_BLOCK_BYTES}.")
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"Invalid calibration directory {str(directory)!r}: not a directory.")
        part = seconds / 3.0

        dram = measure_gather_bytes_per_s(row_bytes, part, device="cpu")
        dram_bytes = _physical_memory_bytes() // ranks_per_host
        host = Tier(
            "host",
            dram_bytes,
            dram,
            CACHE_LINE_BYTES,
            {"row_bytes": row_bytes, "rows_per_s": dram / round_up(row_bytes, CACHE_LINE_BYTES)},
        )
        if compute_device == "cuda":
            import torch

            hbm = measure_gather_bytes_per_s(row_bytes, part, device="cuda")
            hbm_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            device = Tier("device", int(hbm_bytes), hbm, CACHE_LINE_BYTES, {"row_bytes": row_bytes, "memory": "hbm"})
        else:
            device = replace(host, name="device", details={**host.details, "memory": "dram (same as host)"})

        read_bytes = round_up(max(row_bytes, SSD_BLOCK_BYTES), SSD_BLOCK_BYTES)
        qd1, qdn = measure_ssd_random_reads(directory, read_bytes, part, file_bytes, ssd_threads)
        ssd = Tier(
            "ssd",
            shutil.disk_usage(directory).free // ranks_per_host,
            qdn * read_bytes,
            SSD_BLOCK_BYTES,
            {"read_bytes": read_bytes, "iops_qd1": qd1, f"iops_qd{ssd_threads}": qdn, "threads": ssd_threads},
        )
        calibration = {
            "row_bytes": row_bytes,
            "seconds": seconds,
            "file_bytes": file_bytes,
            "directory": str(directory),
            "ranks_per_host": ranks_per_host,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        return cls([device, host, ssd], compute_device, calibration)

    @classmethod
    def load_or_calibrate(cls, path: Union[str, Path], directory: Optional[Union[str, Path]] = None, **kwargs) -> "TierModel":
        """The model saved at ``path``; if there is none, calibrates (on
        ``directory``, default the folder of ``path``) and saves it there."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        model = cls.calibrate(directory if directory is not None else path.parent, **kwargs)
        model.save(path)
        return model


# -- the measurements -----------------------------------------------------------------


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (from sysfs), or a generous guess."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for size_file in base.glob("index*/size"):
        text = size_file.read_text().strip().upper()
        try:
            value = int(text.rstrip("KMG"))
        except ValueError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, value * unit)
    return best or _FALLBACK_LLC_BYTES


def _physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure_gather_bytes_per_s(row_bytes: int, seconds: float, device: str = "cpu", rows_per_call: int = 1 << 16) -> float:
    """Bytes per second of ``index_select`` of random rows of ``row_bytes``
    from a buffer of 4x the last-level cache (at least 256 MiB), on
    ``device``, each row rounded up to a cache line as the memory moves it."""
    import torch

    buffer_bytes = max(4 * last_level_cache_bytes(), 256 << 20)
    num_rows = max(buffer_bytes // row_bytes, rows_per_call)
    # Rows of 4-byte words where the size allows: index_select copies those
    # as embedding rows are copied; a byte tensor takes a slower path.
    dtype, width = (torch.float32, row_bytes // 4) if row_bytes % 4 == 0 else (torch.uint8, row_bytes)
    table = torch.ones(num_rows, width, dtype=dtype, device=device)  # ones: every page is touched
    generator = torch.Generator().manual_seed(0)
    index_sets = [torch.randint(num_rows, (rows_per_call,), generator=generator).to(device) for _ in range(4)]
    out = torch.empty(rows_per_call, width, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.index_select(table, 0, index_sets[0], out=out)  # warm up
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        torch.index_select(table, 0, index_sets[calls % len(index_sets)], out=out)
        calls += 1
        if calls % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    del table
    return calls * rows_per_call * round_up(row_bytes, CACHE_LINE_BYTES) / elapsed


def measure_ssd_random_reads(
    directory: Union[str, Path],
    read_bytes: int,
    seconds: float,
    file_bytes: int = DEFAULT_FILE_BYTES,
    threads: int = DEFAULT_SSD_THREADS,
) -> "tuple[float, float]":
    """Random reads per second of ``read_bytes`` blocks from a temporary file
    in ``directory`` opened with O_DIRECT: ``(at queue depth 1, with
    `threads` reads in flight)``, each over ``seconds / 2``. The file is
    deleted afterwards, whatever happens."""
    if read_bytes % SSD_BLOCK_BYTES:
        raise ValueError(f"Invalid read_bytes={read_bytes}. Must be a multiple of {SSD_BLOCK_BYTES} for O_DIRECT.")
    if not hasattr(os, "O_DIRECT"):
        raise ValueError("This platform has no O_DIRECT: SSD reads cannot bypass the page cache here.")
    file_bytes = round_up(file_bytes, read_bytes)
    handle, name = tempfile.mkstemp(prefix=".dist_rec_tier_calibration_", dir=str(directory))
    try:
        _fill(handle, file_bytes)
        os.close(handle)
        handle = -1
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            raise ValueError(
                f"Cannot open {name} with O_DIRECT ({e.strerror}): the filesystem of {directory} does not bypass "
                "the page cache (tmpfs?). Calibrate on a directory of the SSD."
            ) from None
        try:
            blocks = file_bytes // read_bytes
            qd1 = _reads_per_s(fd, blocks, read_bytes, seconds / 2, 1)
            qdn = _reads_per_s(fd, blocks, read_bytes, seconds / 2, threads)
        finally:
            os.close(fd)
    finally:
        if handle >= 0:
            os.close(handle)
        os.unlink(name)
    return qd1, qdn


def _fill(fd: int, file_bytes: int) -> None:
    """Writes ``file_bytes`` of random data (incompressible: an SSD that
    compresses or dedups must not read zeros for free) and syncs them."""
    chunk = np.random.default_rng(0).bytes(8 << 20)
    written = 0
    while written < file_bytes:
        written += os.write(fd, chunk[: min(len(chunk), file_bytes - written)])
    os.fsync(fd)
    # Not needed under O_DIRECT, but leaves the page cache as it was.
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


_OFFSETS = 4096  # random offsets per thread, reused in turn
_BURST = 16  # reads between looks at the clock


def _reads_per_s(fd: int, blocks: int, read_bytes: int, seconds: float, threads: int) -> float:
    """Random aligned reads per second with ``threads`` threads, each one
    read in flight (os.preadv releases the GIL)."""
    counts = [0] * threads
    errors: List[BaseException] = []
    start_line = threading.Barrier(threads + 1)
    stop_at = [math.inf]

    def reader(i: int) -> None:
        try:
            buffer = mmap.mmap(-1, read_bytes)  # anonymous mappings are page-aligned, as O_DIRECT needs
            offsets = (np.random.default_rng(i + 1).integers(0, blocks, size=_OFFSETS) * read_bytes).tolist()
            start_line.wait()
            n = 0
            while time.perf_counter() < stop_at[0]:  # checked every _BURST reads
                first = n % _OFFSETS
                for offset in offsets[first : first + _BURST]:
                    os.preadv(fd, [buffer], offset)
                n += _BURST
            counts[i] = n
            buffer.close()
        except BaseException as e:  # reported to the caller below
            errors.append(e)
            try:
                start_line.abort()
            except threading.BrokenBarrierError:
                pass

    workers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    try:
        start_line.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    stop_at[0] = start + seconds
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"SSD calibration read failed: {errors[0]!r}") from errors[0]
    return sum(counts) / elapsed


# -- command line ---------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dist_rec.planner.tiers",
        description="Measure this machine's memory tiers (DRAM random-row gathers, SSD O_DIRECT random reads).",
    )
    parser.add_argument("--dir", required=True, help="a directory on the SSD (a temporary file is written there)")
    parser.add_argument("--out", required=True, help="where to write the tier model (JSON)")
    parser.add_argument("--row-bytes", type=int, default=DEFAULT_ROW_BYTES)
    parser.add_argument("--seconds", type=float, default=DEFAULT_CALIBRATION_SECONDS)
    parser.add_argument("--file-mib", type=int, default=DEFAULT_FILE_BYTES >> 20)
    parser.add_argument("--threads", type=int, default=DEFAULT_SSD_THREADS, help="SSD reads in flight")
    parser.add_argument("--ranks-per-host", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    try:
        model = TierModel.calibrate(
            args.dir,
            row_bytes=args.row_bytes,
            seconds=args.seconds,
            file_bytes=args.file_mib << 20,
            ssd_threads=args.threads,
            ranks_per_host=args.ranks_per_host,
            compute_device=args.device,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model.save(args.out)
    print(model)
    ssd = model.tier("ssd").details
    print(f"ssd: {ssd['iops_qd1']:.0f} IOPS at queue depth 1, {ssd[f'iops_qd{args.threads}']:.0f} with {args.threads} threads")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
