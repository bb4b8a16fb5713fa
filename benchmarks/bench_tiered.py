"""Tiered placement of embedding rows (RecShard) against whole-table placement
and the page cache, for a model whose tables do not fit in memory.

The model: 26 tables with Criteo Kaggle's row counts scaled to
``--total-gib`` GiB at ``--dim`` columns (weights plus one float32 row-wise
AdaGrad state per row; tiny tables get at least ``--min-rows`` rows), one
id per bag (pooling factor 1, sum pooling). The ids (``--ids``):

* ``hashed`` (the default), as Criteo's are and as RecShard assumes: each
  feature has Criteo Kaggle's own number of distinct values, drawn by a
  Zipf(``--zipf``) law over their ranks (numpy's, truncated: larger draws
  are drawn again) and hashed into the table's rows by a fixed random map
  (collisions as a real hash has them). The tables are ~4.9x larger than
  the values they hold, so most rows are never read;
* ``dense``: every row is a value; rank ``r`` goes to a fixed random
  permutation of the rows at ``r`` (the hot rows are scattered).

Each step is the embedding part of a training step: a lookup of a batch of
``--batch`` samples, the next batch's prefetch, and row-wise AdaGrad fused
into the backward (a fixed random gradient).

Every variant gets the same DRAM budget (``--budget-gib``):

* ``recshard``: access statistics from ``--stats-batches`` sample batches
  (drawn apart from the timed ones, from the same law; their counts are
  drawn at once, as the multinomial they are), then the
  RecShard MILP (``plan_recshard``, one process holding every table: it
  chooses each table's hot rows under the budget, with the read costs of
  this machine's calibrated tier model), then a ``TieredStorage`` with those
  hot rows in memory, hottest first, and the rest in O_DIRECT files;
* ``table_greedy``: whole tables in memory, largest first, until the budget
  is full, the rest wholly in the same O_DIRECT files (``table_greedy``,
  run through the same ``TieredStorage``);
* ``mmap``: every table memory-mapped (``MemmapStorage``): the OS page cache
  is the cache, bounded by the memory cgroup below, with the kernel's
  read-around on a fault (up to the device's ``read_ahead_kb``). Before its
  warm-up steps it looks up batches drawn like the sample's (``--mmap-replay``
  at most) until its page cache fills the cgroup, so that it starts warm;
* ``mmap_random``: the same with ``madvise(MADV_RANDOM)`` on the maps: no
  read-around, a fault reads its 4 KiB page, the page cache an LRU of
  pages (the strongest form of this baseline; ``MemmapStorage`` does not
  advise its maps itself);
* ``dram``: every row in memory (``InMemoryStorage``), at a size that fits:
  the same 26 tables scaled down to the budget, ids drawn the same way over
  them. The ceiling.

Fairness: the budget counts the hot rows' bytes (weights and state). Each
variant runs alone, in its own process, inside a cgroup-v1 memory cgroup
limited to budget + ``--allowance-gib`` (the limit counts page cache), so
``mmap`` gets the budget as page cache plus the same allowance for the
process itself that the others' processes use (RecShard's spends part of it
on its id map, 4 bytes a row). Each variant's files (``--total-gib`` GiB)
are deleted before the next variant writes its own, under ``--dir`` (a real
filesystem: O_DIRECT does not work on tmpfs).

Reported per variant: examples/s (median over ``--steps`` timed steps after
``--warmup``), slow-tier reads per step (TieredStorage: unique cold rows
read from the SSD (``cold_row_reads``: the unique cold rows of each
batch); mmap: major page faults), SSD blocks and bytes read
per step, and for RecShard the share of the ``dram`` rate; the planner's own
estimate of slow reads against the true expectation (the law is known here)
and against the best any placement of the budget's rows could do. The same
statistics are planned on paper at the ``--sweep-gib`` budgets, with each
plan's expected slow reads. A variant's steps stop once they took
``--max-steps-s`` (an mmap variant can take minutes a step), and the report
says after how many. Then the MILP's solve time on synthetic demands of ``--milp-tables``
tables (``plan_recshard(..., time_limit_s=--milp-time-limit)``). The
acceptance this serves (issue "Tiered placement of embedding rows
(RecShard)"): RecShard >= 3x the examples/s of table_greedy and of mmap,
>= 50x fewer slow-tier reads than table_greedy, 1,000 tables planned in
< 60 s. The script measures and reports; it asserts nothing.

Needs root for the memory cgroup (``--no-cgroup`` runs without a limit and
says so in the report). About 45 GB of free disk at the default size.

    python benchmarks/bench_tiered.py --markdown docs/benchmarks.md --json runs/bench_tiered.json
    python benchmarks/bench_tiered.py --from-json runs/bench_tiered.json --markdown docs/benchmarks.md
    python benchmarks/bench_tiered.py --total-gib 0.2 --budget-gib 0.02 --steps 5 --warmup 2 \\
        --stats-batches 5 --milp-tables 26 100          # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from harness import (
    REPO, busy_note, command_line, machine_summary, markdown_table, update_section, warn_if_busy, write_json,
)  # fmt: skip

sys.path.insert(0, str(REPO))

from bench_train import KAGGLE_ROWS  # noqa: E402  (Criteo Kaggle's 26 row counts)

VARIANTS = ["recshard", "table_greedy", "mmap", "mmap_random", "dram"]
TIERED = ("recshard", "table_greedy")
MMAP = ("mmap", "mmap_random")
LABELS = {
    "recshard": "RecShard (hot rows in DRAM, rest on SSD)",
    "table_greedy": "table-level greedy (whole tables in DRAM, rest on SSD)",
    "mmap": "mmap (page cache, kernel read-around)",
    "mmap_random": "mmap, MADV_RANDOM (page cache as LRU of 4 KiB pages)",
    "dram": "all in DRAM (tables scaled to the budget)",
}
NUM_TABLES = len(KAGGLE_ROWS)
STATE_BYTES = 4  # row-wise AdaGrad: one float32 per row
BLOCK_BYTES = 4096  # the cold files' block (dist_rec.placement.cold_file)
GIB = 1 << 30
INIT_RANGE = (-0.01, 0.01)
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
# Seed streams: each (stream, table) pair has its own generator.
PERMUTATION, STATS, TIMED, PERMUTATION_SMALL, MILP = 0, 1, 2, 3, 4
PROGRESS_EVERY_S = 15.0


# ---------------------------------------------------------------------------
# Tables and ids
# ---------------------------------------------------------------------------


def scaled_rows(total_bytes: float, row_bytes: int, min_rows: int) -> List[int]:
    """Kaggle's row counts scaled so that the 26 tables take ``total_bytes``
    (tables that would fall under ``min_rows`` get ``min_rows``)."""
    floored = [False] * NUM_TABLES
    rows = [min_rows] * NUM_TABLES
    for _ in range(NUM_TABLES):
        free_bytes = total_bytes - sum(min_rows * row_bytes for f in floored if f)
        scalable = sum(k for k, f in zip(KAGGLE_ROWS, floored) if not f)
        scale = max(free_bytes, 0) / (scalable * row_bytes) if scalable else 0.0
        rows = [min_rows if f else max(min_rows, int(k * scale)) for k, f in zip(KAGGLE_ROWS, floored)]
        newly = [not f and r == min_rows for f, r in zip(floored, rows)]
        if not any(newly):
            break
        floored = [f or n for f, n in zip(floored, newly)]
    return rows


def _rng(seed: int, stream: int, table: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, table])


def zipf_ranks(rng: np.random.Generator, exponent: float, rows: int, size: int) -> np.ndarray:
    """``size`` zero-based Zipf ranks below ``rows`` (numpy's Zipf, draws past
    the table drawn again: a truncated Zipf law)."""
    out = np.empty(size, dtype=np.int64)
    filled, accepted = 0, 0.5
    while filled < size:
        need = size - filled
        draw = rng.zipf(exponent, size=int(need / accepted * 1.05) + 64)
        keep = draw[draw <= rows]
        accepted = max(len(keep) / len(draw), 0.01)
        keep = keep[:need]
        out[filled : filled + len(keep)] = keep - 1
        filled += len(keep)
    return out


def values_of(t: int, rows: int, ids: str) -> int:
    """Distinct values of table ``t``'s feature: Criteo Kaggle's own count
    when the ids are hashed (at most the table's rows), every row when dense."""
    return min(KAGGLE_ROWS[t], rows) if ids == "hashed" else rows


def id_map(seed: int, stream: int, table: int, rows: int, values: int, ids: str) -> np.ndarray:
    """Table ``table``'s fixed map from a value's Zipf rank to its row id:
    a hash into the table's rows (collisions as a real hash has them; the
    rows no value hashes to are never read) or, dense, a permutation of the
    rows (every row read, the hot ones scattered)."""
    rng = _rng(seed, stream, table)
    return rng.integers(0, rows, size=values) if ids == "hashed" else rng.permutation(rows)


def zipf_pmf(exponent: float, values: int) -> np.ndarray:
    """The truncated Zipf law over ranks ``0 .. values - 1``."""
    p = np.arange(1, values + 1, dtype=np.float64) ** -exponent
    return p / p.sum()


def in_batch(p: np.ndarray, batch: int) -> np.ndarray:
    """Each row's probability of being read at least once in a batch of ``batch`` ids."""
    return -np.expm1(batch * np.log1p(-np.minimum(p, 1.0 - 1e-16)))


def _cold_counts(ids_nb: np.ndarray, hot: int, positions: Optional[np.ndarray], per_block: int, blocks_per_record: int):
    """Cold reads (ids), unique cold rows and cold blocks of each batch of one
    table, as ``TieredStorage`` reads them: ``(reads, rows, blocks)`` totals."""
    pos = ids_nb if positions is None else positions[ids_nb]
    cold = pos >= hot
    reads, rows, blocks = int(cold.sum()), 0, 0
    for b in range(pos.shape[0]):
        r = np.unique(pos[b][cold[b]] - hot)
        rows += len(r)
        blocks += len(np.unique(r // per_block)) * blocks_per_record
    return reads, rows, blocks


# ---------------------------------------------------------------------------
# The driver: data, plans, one child process per variant
# ---------------------------------------------------------------------------


def _record_layout(dim: int):
    record_bytes = 4 * (dim + 1)
    if record_bytes <= BLOCK_BYTES:
        return BLOCK_BYTES // record_bytes, 1
    return 1, -(-record_bytes // BLOCK_BYTES)


def prepare(args, directory: Path, tiers) -> Dict:
    """Draws the statistics sample and the timed batches, plans RecShard and
    table-level greedy (and, on paper, at each ``--sweep-gib`` budget), saves
    what the workers need under ``directory``."""
    from dist_rec import EmbeddingBagConfig
    from dist_rec.planner.access_stats import AccessStats, TableAccessStats
    from dist_rec.planner.recshard import plan_recshard, table_demands, table_greedy

    dim, batch = args.dim, args.batch
    row_bytes = dim * 4 + STATE_BYTES
    rows = scaled_rows(args.total_gib * GIB, row_bytes, args.min_rows)
    small = scaled_rows(args.budget_gib * GIB, row_bytes, args.min_rows)
    budget = int(args.budget_gib * GIB)
    n_run = args.warmup + args.steps
    replay = args.mmap_replay
    print(f"tables: {NUM_TABLES}, {sum(rows):,} rows x {dim} ({sum(rows) * row_bytes / GIB:.2f} GiB with state), largest "
          f"{max(rows):,}; dram variant {sum(small):,} rows ({sum(small) * row_bytes / GIB:.2f} GiB)", flush=True)  # fmt: skip

    # Ids: the statistics sample's counts, the true law, the timed batches (full and small tables), mmap's warm-up.
    started = time.perf_counter()
    counts: List[np.ndarray] = []
    laws: List[np.ndarray] = []  # each row's probability per lookup
    values = [values_of(t, rows[t], args.ids) for t in range(NUM_TABLES)]
    timed = np.empty((n_run, NUM_TABLES, batch), dtype=np.int64)
    timed_small = np.empty((n_run, NUM_TABLES, batch), dtype=np.int64)
    replayed = np.empty((replay, NUM_TABLES, batch), dtype=np.int32)  # row ids < 2^31
    sample = args.stats_batches * batch
    for t in range(NUM_TABLES):
        mapping = id_map(args.seed, PERMUTATION, t, rows[t], values[t], args.ids)
        pmf = zipf_pmf(args.zipf, values[t])
        rng = _rng(args.seed, STATS, t)
        # The counts of `sample` independent lookups, drawn at once: a multinomial over the values.
        counts.append(np.bincount(mapping, weights=rng.multinomial(sample, pmf), minlength=rows[t]).astype(np.int64))
        laws.append(np.bincount(mapping, weights=pmf, minlength=rows[t]))
        if replay:
            replayed[:, t, :] = mapping[zipf_ranks(rng, args.zipf, values[t], replay * batch)].reshape(replay, batch)
        ranks = zipf_ranks(_rng(args.seed, TIMED, t), args.zipf, values[t], n_run * batch)
        timed[:, t, :] = mapping[ranks].reshape(n_run, batch)
        small_values = values_of(t, small[t], args.ids)
        small_map = id_map(args.seed, PERMUTATION_SMALL, t, small[t], small_values, args.ids)
        ranks = zipf_ranks(_rng(args.seed, TIMED, t), args.zipf, small_values, n_run * batch)
        timed_small[:, t, :] = small_map[ranks].reshape(n_run, batch)
        del mapping, pmf, small_map, ranks
    print(f"drew the counts of {args.stats_batches:,} sample batches, {n_run} timed batches and {replay} warm-up "
          f"batches ({time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip

    # The plans.
    names = [f"t{t}" for t in range(NUM_TABLES)]
    configs = [EmbeddingBagConfig(num_embeddings=rows[t], embedding_dim=dim, name=names[t], feature_names=[f"f{t}"])
               for t in range(NUM_TABLES)]  # fmt: skip
    stats = AccessStats({names[t]: TableAccessStats(names[t], counts[t], sample, sample, sample, [f"f{t}"])
                         for t in range(NUM_TABLES)}, batch, args.stats_batches)  # fmt: skip
    del counts
    demands = table_demands(configs, stats, tiers, batch)
    slow_bytes = shutil.disk_usage(directory).free
    used_rows = [stats[n].used_rows for n in names]
    hot_orders = [stats[n].hot_order() for n in names]
    truth = _Truth(laws, batch)
    del laws  # truth holds them, end to end

    def plan_both(fast_bytes: int):
        recshard = plan_recshard(demands, 1, tiers, fast="device", slow="ssd", fast_bytes=fast_bytes,
                                 slow_bytes=slow_bytes, grid=args.grid, time_limit_s=args.milp_time_limit)  # fmt: skip
        greedy = table_greedy(demands, 1, tiers, fast="device", slow="ssd", fast_bytes=fast_bytes, slow_bytes=slow_bytes)
        return recshard, greedy

    sweep = []
    for gib in args.sweep_gib:
        fast_bytes = int(gib * GIB)
        recshard, greedy = plan_both(fast_bytes)
        rs = truth.slow([recshard.hot_rows[n] for n in names], hot_orders)
        tg = truth.slow([greedy.hot_rows[n] for n in names], None)
        best = truth.best(fast_bytes // row_bytes)
        sweep.append({"budget_gib": gib, "recshard": rs, "table_greedy": tg, "oracle": best,
                      "recshard_method": recshard.method, "recshard_status": recshard.status})  # fmt: skip
        print(f"[sweep] {gib:g} GiB: expected slow reads (ids, rows) per step: recshard {rs[0]:,.0f}, {rs[1]:,.0f}; "
              f"table_greedy {tg[0]:,.0f}, {tg[1]:,.0f}; best possible {best[0]:,.0f}, {best[1]:,.0f}", flush=True)  # fmt: skip
    recshard, greedy = plan_both(budget)
    print(f"recshard plan: {recshard.method} ({recshard.status}) in {recshard.solve_s:.2f} s, "
          f"{sum(recshard.hot_rows.values()):,} hot rows; table_greedy: "
          f"{sum(1 for n in names if greedy.hot_rows[n])} tables in memory", flush=True)  # fmt: skip

    # Row orders for the workers, and what each plan reads from the SSD: the true expectation and, exactly, the run's.
    plan_dir = directory / "plan"
    plan_dir.mkdir(parents=True, exist_ok=True)
    per_block, blocks_per_record = _record_layout(dim)
    plans = {}
    orders: List[Optional[str]] = [None] * NUM_TABLES
    for name, result in (("recshard", recshard), ("table_greedy", greedy)):
        hot_rows = [int(result.hot_rows[n]) for n in names]
        expected = truth.slow(hot_rows, hot_orders if name == "recshard" else None)
        plans[name] = {
            "method": result.method, "status": result.status, "solve_s": result.solve_s, "hot_rows": hot_rows,
            "estimated_slow_reads_per_step": float(result.slow_reads_per_batch),
            "expected_slow_reads_per_step": expected[0], "expected_slow_rows_per_step": expected[1],
            "run_cold_reads": 0, "run_cold_rows": 0, "run_cold_blocks": 0,
        }  # fmt: skip
    best = truth.best(budget // row_bytes)
    for t, name in enumerate(names):
        order = hot_orders[t] if 0 < plans["recshard"]["hot_rows"][t] < rows[t] else None
        if order is not None:
            path = plan_dir / f"order_{t}.npy"
            np.save(path, order)
            orders[t] = str(path)
        for variant in ("recshard", "table_greedy"):
            plan = plans[variant]
            positions = None
            if variant == "recshard" and order is not None:
                positions = np.empty(rows[t], dtype=np.int64)
                positions[order] = np.arange(rows[t])
            reads, cold_rows, blocks = _cold_counts(timed[:, t, :], plan["hot_rows"][t], positions, per_block,
                                                    blocks_per_record)  # fmt: skip
            plan["run_cold_reads"] += reads
            plan["run_cold_rows"] += cold_rows
            plan["run_cold_blocks"] += blocks
        del order
    read_rows = int(np.count_nonzero(truth.law))
    del stats, demands, truth, hot_orders
    gc.collect()

    batches = directory / "batches.npz"
    np.savez(batches, timed=timed, timed_small=timed_small, replay=replayed)
    return {
        "rows": rows, "small_rows": small, "row_bytes": row_bytes, "budget_bytes": budget, "used_rows": used_rows,
        "values": values, "rows_ever_read": read_rows, "best_slow_per_step": best, "sweep": sweep,
        "plans": plans, "orders": orders, "batches": str(batches), "replay_batches": replay,
    }  # fmt: skip


class _Truth:
    """Expected slow-tier reads per step under the true law (known here):
    ids read, and rows read (each row once per batch, as ``TieredStorage``
    reads them), for a plan's hot rows or for the best possible choice of
    ``k`` rows (the ``k`` most likely over every table)."""

    def __init__(self, laws: List[np.ndarray], batch: int) -> None:
        self.batch = batch
        self.law = np.concatenate(laws)  # every table's rows, end to end; per table: views
        self.read = in_batch(self.law, batch)
        ends = np.cumsum([law.size for law in laws])[:-1]
        self.laws, self.rows_read = np.split(self.law, ends), np.split(self.read, ends)

    def slow(self, hot_rows: Sequence[int], hot_orders: Optional[List[np.ndarray]]) -> tuple:
        ids = rows = 0.0
        for t, (law, read) in enumerate(zip(self.laws, self.rows_read)):
            hot = hot_rows[t]
            if hot >= law.size:
                continue
            chosen = hot_orders[t][:hot] if hot_orders is not None else slice(0, hot)
            ids += self.batch * max(0.0, 1.0 - float(law[chosen].sum()))
            rows += float(read.sum() - read[chosen].sum())
        return ids, rows

    def best(self, k: int) -> tuple:
        law = self.law
        if k >= law.size:
            return 0.0, 0.0
        cold = np.argpartition(law, law.size - k)[: law.size - k]
        return self.batch * float(law[cold].sum()), float(self.read[cold].sum())


class _Cgroup:
    """A cgroup-v1 memory cgroup limited to ``limit`` bytes (page cache included)."""

    def __init__(self, name: str, limit: int) -> None:
        self.path = CGROUP_ROOT / name
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        self.limit = int((self.path / "memory.limit_in_bytes").read_text())

    def figures(self) -> Dict:
        def read(name: str) -> str:
            try:
                return (self.path / name).read_text()
            except OSError:
                return ""

        oom = dict(line.split() for line in read("memory.oom_control").splitlines() if len(line.split()) == 2)
        return {
            "limit_bytes": self.limit,
            "peak_bytes": int(read("memory.max_usage_in_bytes") or 0),
            "failcnt": int(read("memory.failcnt") or 0),
            "oom_kills": int(oom.get("oom_kill", 0)),
        }

    def remove(self) -> None:
        try:
            (self.path / "memory.force_empty").write_text("0")
        except OSError:
            pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.2)
        print(f"warning: could not remove the cgroup {self.path}", flush=True)


def run_variant(variant: str, args, directory: Path, prepared: Dict) -> Dict:
    """One variant in a fresh process (in its memory cgroup); its files are
    deleted afterwards, whatever happens."""
    vdir = directory / variant
    shutil.rmtree(vdir, ignore_errors=True)
    vdir.mkdir(parents=True)
    rows = prepared["small_rows"] if variant == "dram" else prepared["rows"]
    # Disk: every row (the tiered files pad blocks: 15 rows of 260 bytes fill 3900 of 4096), none for dram.
    need = 0 if variant == "dram" else sum(rows) * prepared["row_bytes"] * 1.1
    free = shutil.disk_usage(directory).free
    if need + GIB > free:
        raise SystemExit(f"{variant}: needs {need / GIB:.1f} GiB of disk under {directory}; {free / GIB:.1f} GiB free.")
    config = {
        "variant": variant, "dir": str(vdir), "rows": rows, "dim": args.dim, "batch": args.batch,
        "warmup": args.warmup, "steps": args.steps, "batches": prepared["batches"],
        "hot_rows": prepared["plans"][variant]["hot_rows"] if variant in TIERED else None,
        "orders": prepared["orders"] if variant == "recshard" else [None] * NUM_TABLES,
        "replay": prepared["replay_batches"] if variant in MMAP else 0, "seed": args.seed, "threads": args.io_threads,
        "max_steps_s": args.max_steps_s,
    }  # fmt: skip
    config_path = directory / f"{variant}.config.json"
    result_path = directory / f"{variant}.result.json"
    config_path.write_text(json.dumps(config))
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--worker-config", str(config_path),
               "--result", str(result_path)]  # fmt: skip
    cgroup = None
    limit = prepared["budget_bytes"] + int(args.allowance_gib * GIB)
    if not args.no_cgroup:
        cgroup = _Cgroup(f"bench_tiered_{os.getpid()}_{variant}", limit)
        # The shell joins the cgroup, then becomes the worker: every byte the worker touches is charged.
        command = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup.path / "cgroup.procs"), *command]
        print(f"[{variant}] cgroup {cgroup.path} limited to {cgroup.limit / GIB:.2f} GiB", flush=True)
    started = time.perf_counter()
    proc = None
    try:
        proc = subprocess.Popen(command)
        code = proc.wait()
        proc = None
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        figures = cgroup.figures() if cgroup is not None else {"limit_bytes": None}
        shutil.rmtree(vdir, ignore_errors=True)
        if cgroup is not None:
            cgroup.remove()
        print(f"[{variant}] files under {vdir} deleted" + (f", cgroup {cgroup.path} removed" if cgroup else ""), flush=True)
    wall = time.perf_counter() - started
    if code != 0 or not result_path.exists():
        why = f"exit {code}" + (f", {figures['oom_kills']} OOM kill(s) in its cgroup" if figures.get("oom_kills") else "")
        print(f"[{variant}] FAILED ({why})", flush=True)
        return {"variant": variant, "failed": why, "cgroup": figures, "wall_s": wall}
    result = json.loads(result_path.read_text())
    result_path.unlink()
    config_path.unlink()
    result.update(cgroup=figures, wall_s=wall)
    print(f"[{variant}] {result['examples_per_s']:,.0f} examples/s; {wall:.0f} s in all", flush=True)
    return result


# ---------------------------------------------------------------------------
# The MILP on synthetic demands
# ---------------------------------------------------------------------------


class _ZipfCdf:
    """``cdf[r]``: the share of a table's reads that its ``r`` hottest rows
    serve under Zipf(``exponent``) over its ``used`` rows, computed when
    indexed (the planner only indexes it; 1,000 tables' arrays would take GiBs)."""

    _PREFIX = 64

    def __init__(self, exponent: float, rows: int, used: int) -> None:
        from scipy.special import zeta

        self.a, self.rows, self.used = exponent, rows, used
        self.zeta = float(zeta(exponent))
        self.prefix = np.concatenate([[0.0], np.cumsum(np.arange(1, self._PREFIX + 1, dtype=np.float64) ** -exponent)])
        self.total = self._h(used)

    def _h(self, r: int) -> float:
        if r <= self._PREFIX:
            return float(self.prefix[r])
        a = self.a  # Euler-Maclaurin: H(r) = zeta(a) - sum_{k > r} k^-a
        return self.zeta - r ** (1 - a) / (a - 1) + 0.5 * r**-a - a * r ** (-a - 1) / 12

    def __getitem__(self, r) -> float:
        return self._h(min(int(r), self.used)) / self.total

    def __len__(self) -> int:
        return self.rows + 1


def milp_timings(args, tiers) -> List[Dict]:
    from dist_rec.planner.recshard import TableDemand, _candidates, plan_recshard

    row_bytes = args.dim * 4 + STATE_BYTES
    read_seconds = {t.name: t.seconds_per_row(args.dim * 4) for t in tiers.tiers}
    out = []
    for n in args.milp_tables:
        rng = _rng(args.seed, MILP, n)
        demands = []
        for i in range(n):
            rows = max(args.min_rows, int(KAGGLE_ROWS[i % NUM_TABLES] * rng.uniform(0.25, 4.0)))
            used = max(1, int(rows * rng.uniform(0.05, 1.0)))
            pooling = float(rng.choice([1, 1, 1, 2, 5, 20]))
            demands.append(TableDemand(f"s{i}", rows, row_bytes, pooling * args.batch, _ZipfCdf(rng.uniform(1.05, 1.3), rows, used),
                                       used, args.dim, dict(read_seconds)))  # fmt: skip
        total = sum(d.num_rows * d.row_bytes for d in demands)
        biggest = max(d.num_rows * d.row_bytes for d in demands)
        for ws in args.milp_world_sizes:
            fast = int(args.milp_fast_share * total / ws)
            slow = int(max(2 * total / ws, 2 * biggest))
            binaries = ws * sum(len(_candidates(d, args.milp_grid)) for d in demands)
            tick = time.perf_counter()
            result = plan_recshard(demands, ws, tiers, fast_bytes=fast, slow_bytes=slow, grid=args.milp_grid,
                                   time_limit_s=args.milp_time_limit)  # fmt: skip
            wall = time.perf_counter() - tick
            out.append({"tables": n, "world_size": ws, "binaries": binaries, "method": result.method,
                        "status": result.status, "solve_s": result.solve_s, "wall_s": wall,
                        "candidate_costs_ms": {k: 1e3 * v for k, v in result.candidate_costs_s.items()},
                        "time_limit_s": args.milp_time_limit})  # fmt: skip
            print(f"[milp] {n} tables on {ws} rank(s), {binaries:,} binaries: {result.method} ({result.status}) in "
                  f"{result.solve_s:.2f} s", flush=True)  # fmt: skip
    return out


# ---------------------------------------------------------------------------
# The worker: one variant, in its own process
# ---------------------------------------------------------------------------


def _io_bytes() -> Dict[str, int]:
    """This process's bytes read from / written to storage (all threads)."""
    out = {}
    try:
        for line in open("/proc/self/io"):
            key, value = line.split(":")
            out[key.strip()] = int(value)
    except OSError:
        pass
    return {"read": out.get("read_bytes", 0), "write": out.get("write_bytes", 0)}


def _peak_rss() -> int:
    """VmHWM (ru_maxrss would carry the driver's, from before the exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cgroup_memory():
    """``(usage(), limit)`` of this process's memory cgroup (limit inf without one)."""
    path = CGROUP_ROOT / _my_cgroup().lstrip("/")
    try:
        limit = int((path / "memory.limit_in_bytes").read_text())
    except (OSError, ValueError):
        return (lambda: 0), math.inf
    if path == CGROUP_ROOT:
        return (lambda: 0), math.inf

    def usage() -> int:
        try:
            return int((path / "memory.usage_in_bytes").read_text())
        except (OSError, ValueError):
            return 0

    return usage, limit


def _read_ahead_kb(path: Path) -> Optional[int]:
    """The read-ahead of the block device holding ``path`` (sysfs), if known."""
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for queue in (base / "queue", base / ".." / "queue"):
        try:
            return int((queue / "read_ahead_kb").read_text())
        except (OSError, ValueError):
            continue
    return None


def _major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def _my_cgroup() -> str:
    try:
        for line in open("/proc/self/cgroup"):
            parts = line.strip().split(":", 2)
            if len(parts) == 3 and "memory" in parts[1].split(","):
                return parts[2]
    except OSError:
        pass
    return ""


class _InitProgress(threading.Thread):
    """Prints ``written() / total`` bytes every ``PROGRESS_EVERY_S`` seconds."""

    def __init__(self, label: str, written: Callable[[], int], total: int) -> None:
        super().__init__(daemon=True)
        self.label, self.written, self.total = label, written, total
        self.done = threading.Event()
        self.started = time.perf_counter()

    def run(self) -> None:
        while not self.done.wait(PROGRESS_EVERY_S):
            done, elapsed = self.written(), time.perf_counter() - self.started
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - done) / rate if rate > 0 else float("nan")
            print(f"[{self.label}] initialising: {done / GIB:.1f} of {self.total / GIB:.1f} GiB written "
                  f"({rate / 2**20:.0f} MiB/s), ETA {eta:.0f} s", flush=True)  # fmt: skip

    def stop(self) -> None:
        self.done.set()


def _allocated_bytes(directory: Path, suffix: str) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.glob(f"*{suffix}"))


def worker(args) -> None:
    import torch

    from dist_rec.optim import RowWiseAdagrad
    from dist_rec.placement import InMemoryStorage, MemmapStorage, TableSpec
    from dist_rec.placement.tiered import TieredStorage

    class _Memmap(MemmapStorage):
        advice: Optional[int] = None

        # MemmapStorage writes zeros over every new file; a new file of np.memmap(mode="w+") is zeros already,
        # and the benchmark writes every row right after: skip the first 40 GiB write. And advise the maps.
        def _map(self, path: str, dtype, shape):
            array = np.memmap(path, dtype=dtype, mode="w+", shape=shape)
            if self.advice is not None:
                array._mmap.madvise(self.advice)
            return array

        def drop_cache(self) -> None:
            """Evicts the files' pages (written back first): the initialisation's pages are no cache."""
            import mmap

            self.flush()
            for array in [*self._weights, *(a for state in self._states for a in state.values())]:
                array._mmap.madvise(mmap.MADV_DONTNEED)  # unmapped from this process; still cached
                fd = os.open(array.filename, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean and unmapped: dropped
                finally:
                    os.close(fd)

    cfg = json.loads(Path(args.worker_config).read_text())
    variant, label = cfg["variant"], cfg["variant"]
    rows, dim, batch = cfg["rows"], cfg["dim"], cfg["batch"]
    directory = Path(cfg["dir"])
    n_run = cfg["warmup"] + cfg["steps"]
    data = np.load(cfg["batches"])
    ids = data["timed_small"] if variant == "dram" else data["timed"]
    optimizer = RowWiseAdagrad(lr=0.01, eps=1e-8)
    specs = [TableSpec(f"t{t}", rows[t], dim) for t in range(NUM_TABLES)]
    cpu = torch.device("cpu")
    torch.manual_seed(cfg["seed"])
    row_bytes = dim * 4 + STATE_BYTES

    tick = time.perf_counter()
    if variant in TIERED:
        orders = [np.load(p, mmap_mode="c") if p else None for p in cfg["orders"]]  # copy-on-write maps: no private copy
        storage = TieredStorage(specs, optimizer.state_names, cpu, directory, cfg["hot_rows"], orders, threads=cfg["threads"])
        del orders
        total = sum(p.stat().st_size for p in directory.glob("*.cold"))
        progress = _InitProgress(label, lambda: _allocated_bytes(directory, ".cold"), total)
        progress.start()
        storage.reset_([INIT_RANGE] * NUM_TABLES)
        storage.flush()
        progress.stop()
    elif variant in MMAP:
        import mmap

        _Memmap.advice = mmap.MADV_RANDOM if variant == "mmap_random" else None
        storage = _Memmap(specs, optimizer.state_names, cpu, directory)
        written = [0]
        progress = _InitProgress(label, lambda: written[0], sum(rows) * row_bytes)
        progress.start()
        chunk = max(1, (256 << 20) // (dim * 4))
        since_flush = 0
        for t, spec in enumerate(specs):
            for start in range(0, spec.num_rows, chunk):
                n = min(chunk, spec.num_rows - start)
                weight = torch.empty(n, dim).uniform_(*INIT_RANGE)
                storage.write_block(t, start, weight, {name: torch.zeros(n) for name in optimizer.state_names})
                written[0] += n * row_bytes
                since_flush += n * row_bytes
                if since_flush >= 256 << 20:  # few dirty pages at a time inside the cgroup's limit
                    storage.flush()
                    since_flush = 0
        storage.drop_cache()
        progress.stop()
        usage, limit = _cgroup_memory()
        print(f"[{label}] page cache dropped after the initialisation: cgroup memory {usage() / GIB:.2f} GiB", flush=True)
    else:
        storage = InMemoryStorage(specs, optimizer.state_names, cpu)
        storage.reset_([INIT_RANGE] * NUM_TABLES)
    init_s = time.perf_counter() - tick
    print(f"[{label}] initialised in {init_s:.1f} s", flush=True)

    layout = (list(range(NUM_TABLES)), [0] * NUM_TABLES, [t * dim for t in range(NUM_TABLES)])  # 0: sum pooling
    offsets = torch.arange(NUM_TABLES * batch + 1, dtype=torch.int64)  # one id per bag
    # Batches are distinct tensors (TieredStorage knows a prefetched batch by its tensors), all alive to the end.
    indices = [torch.from_numpy(np.ascontiguousarray(ids[i]).reshape(-1)) for i in range(n_run)]
    grad = torch.randn(batch, NUM_TABLES * dim, generator=torch.Generator().manual_seed(cfg["seed"])) * 0.01

    replay_s, replayed = 0.0, 0
    if cfg["replay"]:
        # Lookups of the sample's batches, newest last, until the page cache fills the cgroup (or they run out).
        replay = data["replay"]
        usage, limit = _cgroup_memory()
        tick = time.perf_counter()
        for i in range(len(replay)):
            ids_i = torch.from_numpy(np.ascontiguousarray(replay[i]).reshape(-1)).to(torch.int64)
            storage.forward(layout, ids_i, offsets, None)
            replayed = i + 1
            full = usage() >= 0.95 * limit
            if replayed % 10 == 0 or replayed == len(replay) or full:
                elapsed = time.perf_counter() - tick
                print(f"[{label}] replaying the statistics sample: {replayed}/{len(replay)} batches, cgroup memory "
                      f"{usage() / GIB:.2f} of {limit / GIB:.2f} GiB, ETA {elapsed / replayed * (len(replay) - replayed):.0f} s"
                      + (" (full: warm)" if full else ""), flush=True)  # fmt: skip
            if full:
                break
        replay_s = time.perf_counter() - tick

    tiered = variant in TIERED
    rows_before = storage.cold_row_reads if tiered else 0
    blocks_before = storage.cold_blocks_read() if tiered else 0
    io_all_before = _io_bytes()
    window: Dict[str, Dict] = {}
    times: List[float] = []
    storage.prefetch(layout, indices[0], offsets)
    loop_start = time.perf_counter()
    ran = 0
    for i in range(n_run):
        if i > cfg["warmup"] and time.perf_counter() - loop_start > cfg["max_steps_s"]:
            print(f"[{label}] stopped after {i} of {n_run} steps: past --max-steps-s {cfg['max_steps_s']:g} s", flush=True)
            break
        if i == cfg["warmup"]:
            window["before"] = {"io": _io_bytes(), "faults": _major_faults()}
        tick = time.perf_counter()
        storage.forward(layout, indices[i], offsets, None)
        if i + 1 < n_run:
            storage.prefetch(layout, indices[i + 1], offsets)
        storage.fused_update(optimizer, layout, indices[i], offsets, None, grad)
        dt = time.perf_counter() - tick
        ran = i + 1
        times.append(dt)
        elapsed = time.perf_counter() - loop_start
        phase = "warm-up" if i < cfg["warmup"] else "timed"
        print(f"[{label}] step {i + 1}/{n_run} ({phase}): {dt:.3f} s, {batch / dt:,.0f} examples/s, "
              f"ETA {elapsed / (i + 1) * (n_run - i - 1):.0f} s", flush=True)  # fmt: skip
    window["after"] = {"io": _io_bytes(), "faults": _major_faults()}
    tick = time.perf_counter()
    if hasattr(storage, "flush"):  # write-backs and dirty pages (InMemoryStorage has nothing to flush)
        storage.flush()
    flush_s = time.perf_counter() - tick
    timed = times[cfg["warmup"] :]
    steps = len(timed)
    result = {
        "variant": variant,
        "rows": sum(rows),
        "table_bytes": sum(rows) * row_bytes,
        "init_s": init_s,
        "replay_batches": replayed,
        "replay_s": replay_s,
        "warmup_step_s": times[: cfg["warmup"]],
        "step_s": timed,
        "examples_per_s": batch / statistics.median(timed),
        "final_flush_s": flush_s,
        # Per timed step, from this process's counters (mmap: faults and the bytes they read).
        "major_faults_per_step": (window["after"]["faults"] - window["before"]["faults"]) / steps,
        "io_read_bytes_per_step": (window["after"]["io"]["read"] - window["before"]["io"]["read"]) / steps,
        "io_write_bytes_per_step": (window["after"]["io"]["write"] - window["before"]["io"]["write"]) / steps,
        "peak_rss_bytes": _peak_rss(),
        "cgroup_path": _my_cgroup(),
    }
    result.update(steps_run=ran, steps_planned=n_run)
    if tiered:
        # Over every batch run (warm-up and timed): the prefetch of a batch runs a step ahead, so its
        # block reads belong to no single step; these totals are exact. Stopped early, the next batch's
        # prefetch was read too.
        read = n_run if ran == n_run else ran + 1
        result.update(
            hot_rows=sum(cfg["hot_rows"]),
            fast_bytes=sum(cfg["hot_rows"]) * row_bytes,
            cold_rows_per_step=(storage.cold_row_reads - rows_before) / read,  # unique cold rows of each batch
            cold_blocks_per_step=(storage.cold_blocks_read() - blocks_before) / read,
            io_read_bytes_per_step_all=(_io_bytes()["read"] - io_all_before["read"]) / read,
        )
        storage.close()
    elif variant == "dram":
        result.update(hot_rows=sum(rows), fast_bytes=sum(rows) * row_bytes)
    else:
        result.update(hot_rows=0, fast_bytes=0)
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def _gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _ratio(a: Optional[float], b: Optional[float], digits: int = 1) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.{digits}f}x"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "es" if noun.endswith(("s", "h")) else "s")


def _ids_text(a: Dict, prepared: Dict) -> str:
    if a.get("ids", "dense") == "dense":
        return f"ids Zipf({a['zipf']:g}) truncated to each table, hot rows scattered by a fixed permutation"
    return (f"ids hashed as Criteo's are: each feature's {sum(prepared['values']):,} distinct values in all (Criteo "
            f"Kaggle's counts) drawn Zipf({a['zipf']:g}) and hashed into its table's rows by a fixed random map, so "
            "that most rows are never read")


def _markdown(data: Dict) -> str:
    a = data["args"]
    prepared, results, tiers = data["prepared"], data["variants"], data["tiers"]
    rows, small = prepared["rows"], prepared["small_rows"]
    row_bytes, budget = prepared["row_bytes"], prepared["budget_bytes"]
    ssd = tiers.get("ssd", {})
    qdn = ssd.get(f"iops_qd{ssd.get('threads', 8)}", 0)
    replays = ", ".join(f"{v}: {_count(results[v].get('replay_batches', 0), 'batch')}" for v in MMAP if v in results
                        and not results[v].get("failed")) or "none run"  # fmt: skip
    read_ahead = data.get("read_ahead_kb")
    limit = "no memory cgroup (**mmap's page cache was not bounded**)" if a["no_cgroup"] else (
        f"each variant alone in a process inside a cgroup-v1 memory cgroup of budget + {a['allowance_gib']:g} GiB "
        "(page cache counted)")  # fmt: skip
    lines = [
        "## Tiered placement: RecShard vs table-level greedy vs mmap (bench_tiered.py)",
        "",
        f"`{command_line(__file__, data['argv'])}`",
        "",
        f"{data['machine']}.{busy_note(data['load'])} SSD (O_DIRECT 4 KiB random reads, calibrated): "
        f"{ssd.get('iops_qd1', 0):,.0f} IOPS at queue depth 1, {qdn:,.0f} "
        f"with {ssd.get('threads', 8)} threads. The device's read-ahead (mmap's read-around on a fault): "
        f"{'unknown' if read_ahead is None else f'{read_ahead} KiB'}.",
        "",
        f"26 tables with Criteo Kaggle's row counts scaled to {sum(rows) * row_bytes / GIB:.1f} GiB "
        f"({sum(rows):,} rows x {a['dim']} float32 + row-wise AdaGrad state; largest {max(rows):,} rows), one id per bag, "
        f"sum pooling, {_ids_text(a, prepared)}; "
        f"batch {a['batch']}, lookup + next batch's prefetch + fused row-wise AdaGrad per step; median of {a['steps']} "
        f"steps after {a['warmup']} warm-up steps. DRAM budget **{budget / GIB:g} GiB** of rows for every variant; "
        f"{limit}. RecShard plans from the counts of {a['stats_batches']:,} sample batches (drawn apart from the timed "
        f"ones, from the same law), on a grid of {a.get('grid', 20)}; the mmap variants first look up batches drawn "
        f"the same way until their page cache fills the cgroup ({replays}; lookups only). The `dram` ceiling runs the "
        f"same tables scaled to the budget ({sum(small):,} rows).",
        "",
    ]
    header = ["variant", "rows in DRAM (GiB)", "cgroup limit / peak (GiB)", "examples/s", "vs dram",
              "slow-tier reads / step", "SSD blocks / step", "SSD MiB / step", "init (s)"]  # fmt: skip
    table = []
    dram_rate = results.get("dram", {}).get("examples_per_s")
    for variant in a["variants"]:
        r = results.get(variant)
        if r is None:
            continue
        cg = r.get("cgroup", {})
        limits = f"{_gib(cg.get('limit_bytes'))} / {_gib(cg.get('peak_bytes'))}" if cg.get("limit_bytes") else "-"
        if r.get("failed"):
            table.append([LABELS[variant], "-", limits, f"failed ({r['failed']})", "-", "-", "-", "-", "-"])
            continue
        if variant in TIERED:
            reads = f"{r['cold_rows_per_step']:,.0f} rows"
            blocks = f"{r['cold_blocks_per_step']:,.0f}"
            mib = f"{r['cold_blocks_per_step'] * BLOCK_BYTES / 2**20:.1f}"
        elif variant in MMAP:
            reads = f"{r['major_faults_per_step']:,.0f} page faults"
            blocks = f"{r['io_read_bytes_per_step'] / BLOCK_BYTES:,.0f}"
            mib = f"{r['io_read_bytes_per_step'] / 2**20:.1f}"
        else:
            reads, blocks, mib = "0", "0", "0"
        fast = "page cache" if variant in MMAP else _gib(r.get("fast_bytes"))
        rate = f"**{r['examples_per_s']:,.0f}**"
        if r.get("steps_run", r.get("steps_planned")) != r.get("steps_planned"):
            rate += f" ({r['steps_run'] - a['warmup']} timed steps: time limit)"
        table.append([LABELS[variant], fast, limits, rate,
                      _ratio(r["examples_per_s"], dram_rate, 2) if variant != "dram" else "1x",
                      reads, blocks, mib, f"{r['init_s']:.0f}"])  # fmt: skip
    lines += [markdown_table(header, table), ""]

    ok = {v: r for v, r in results.items() if not r.get("failed")}
    if "recshard" in ok:
        rs = ok["recshard"]
        parts = []
        if "table_greedy" in ok:
            tg = ok["table_greedy"]
            fewer = tg["cold_rows_per_step"] / rs["cold_rows_per_step"] if rs["cold_rows_per_step"] else math.inf
            plans = prepared["plans"]
            ids = plans["table_greedy"]["run_cold_reads"] / max(plans["recshard"]["run_cold_reads"], 1)
            parts.append(f"{_ratio(rs['examples_per_s'], tg['examples_per_s'], 2)} the examples/s of table-level greedy "
                         f"(target >= 3x) with {fewer:.1f}x fewer slow-tier reads, counted as rows read from the SSD "
                         f"({ids:.1f}x fewer counted as lookups served by it; target >= 50x)")  # fmt: skip
        for variant in MMAP:
            if variant in ok:
                parts.append(f"{_ratio(rs['examples_per_s'], ok[variant]['examples_per_s'], 2)} those of {variant} "
                             "(target >= 3x)")  # fmt: skip
        if dram_rate:
            parts.append(f"{rs['examples_per_s'] / dram_rate:.1%} of the all-in-DRAM rate")
        if parts:
            lines += ["RecShard: " + "; ".join(parts) + ".", ""]

    plans = prepared["plans"]
    n_run = a["warmup"] + a["steps"]
    plan_rows = []
    for variant in TIERED:
        p = plans[variant]
        hot = sum(p["hot_rows"])
        rows_expected = p.get("expected_slow_rows_per_step")
        plan_rows.append([variant, f"{p['method']} ({p['status']}, {p['solve_s']:.2f} s)", f"{hot:,}",
                          f"{hot * row_bytes / GIB:.2f} of {budget / GIB:g}",
                          f"{p['estimated_slow_reads_per_step']:,.0f}", f"{p['expected_slow_reads_per_step']:,.0f}",
                          "-" if rows_expected is None else f"{rows_expected:,.0f}",
                          f"{p['run_cold_reads'] / n_run:,.0f}", f"{p['run_cold_rows'] / n_run:,.0f}"])  # fmt: skip
    best = prepared.get("best_slow_per_step")
    if best is not None:
        plan_rows.append(["best possible", "the budget's most likely rows under the true law", "-", f"{budget / GIB:g}",
                          "-", f"{best[0]:,.0f}", f"{best[1]:,.0f}", "-", "-"])  # fmt: skip
    used = sum(prepared["used_rows"])
    ever = prepared.get("rows_ever_read")
    lines += [
        f"The plans (slow-tier reads per step of {a['batch'] * NUM_TABLES:,} lookups: the planner's estimate from its "
        "sample; the expectation under the true law, as lookups served by the SSD and as rows read from it (each "
        "cold row once per batch); and in the run, both counted. "
        f"The sample read {used:,} distinct rows"
        + (f"; {ever:,} of the {sum(rows):,} rows can ever be read" if ever is not None else "") + "):",
        "",
        markdown_table(["plan", "method", "hot rows", "GiB of rows in DRAM", "estimated slow lookups",
                        "expected lookups", "expected rows", "in the run (lookups)", "in the run (rows)"],
                       plan_rows),  # fmt: skip
        "",
    ]
    if prepared.get("sweep"):
        sweep_rows = []
        for point in prepared["sweep"]:
            rs, tg, best = point["recshard"], point["table_greedy"], point["oracle"]
            sweep_rows.append([f"{point['budget_gib']:g}", f"{rs[0]:,.0f} / {rs[1]:,.0f}", f"{tg[0]:,.0f} / {tg[1]:,.0f}",
                               f"{best[0]:,.0f} / {best[1]:,.0f}", _ratio(tg[0], rs[0]), _ratio(tg[1], rs[1])])  # fmt: skip
        lines += [
            "The same statistics planned at other DRAM budgets, on paper: expected slow-tier lookups / rows read per "
            "step under the true law, and how many times fewer RecShard's are than table-level greedy's:",
            "",
            markdown_table(["DRAM budget (GiB)", "RecShard", "table-level greedy", "best possible",
                            "fewer lookups", "fewer rows"], sweep_rows),  # fmt: skip
            "",
        ]
    if data.get("milp"):
        milp_rows = [[m["tables"], m["world_size"], f"{m['binaries']:,}", m["method"], m["status"],
                      f"**{m['solve_s']:.2f}**"] for m in data["milp"]]  # fmt: skip
        if data.get("milp_argv"):
            lines += [f"MILP timings measured again later: `{command_line(__file__, data['milp_argv'])}`.", ""]
        lines += [
            f"RecShard's MILP on synthetic demands (Kaggle-like sizes x 0.25-4, Zipf 1.05-1.3 over 5-100% of the rows, "
            f"pooling 1-20; DRAM {a['milp_fast_share']:.0%} of the rows' bytes; `time_limit_s={a['milp_time_limit']:g}`; "
            f"grid {a.get('milp_grid', 20)}; solve time includes the greedy plan it starts from; target: 1,000 tables "
            "in < 60 s):",
            "",
            markdown_table(["tables", "ranks", "binaries", "method", "status", "solve (s)"], milp_rows),
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-gib", type=float, default=40.0, help="the 26 tables' size with their state (default 40)")
    parser.add_argument("--budget-gib", type=float, default=6.0, help="DRAM for rows, every variant (default 6: 15%% of the rows)")
    parser.add_argument("--allowance-gib", type=float, default=2.0,
                        help="memory for the process itself, added to the budget in each variant's cgroup (default 2)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--min-rows", type=int, default=1000, help="rows of the tiniest tables (default 1000)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the ids (> 1; default 1.1, the main job's)")
    parser.add_argument("--ids", choices=["hashed", "dense"], default="hashed",
                        help="hashed: Criteo Kaggle's distinct values per feature hashed into the larger tables (most "
                        "rows never read, as in RecShard's hash tables); dense: every row a value (default hashed)")
    parser.add_argument("--sweep-gib", type=float, nargs="*", default=[2.0, 4.0, 6.0, 8.0],
                        help="DRAM budgets planned on paper, with the expected slow reads of each plan (none: skip)")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the timed ones (default 5)")
    parser.add_argument("--stats-batches", type=int, default=100_000,
                        help="batches of the sample RecShard plans from (default 100,000: 205M samples per table at "
                             "batch 2048; their counts are drawn at once, as a multinomial)")
    parser.add_argument("--mmap-replay", type=int, default=200,
                        help="most batches (drawn like the sample's) the mmap variants look up to fill their cache "
                             "before the warm-up (default 200; 0: none)")
    parser.add_argument("--grid", type=int, default=50, help="hot fractions k / grid of the plan's MILP (default 50)")
    parser.add_argument("--milp-grid", type=int, default=20, help="the same for the MILP timings (default 20, the planner's)")
    parser.add_argument("--io-threads", type=int, default=8, help="TieredStorage's reads in flight (default 8)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--max-steps-s", type=float, default=900.0,
                        help="a variant's steps stop (after its warm-up and one timed step) once they took this long "
                             "(default 900)")
    parser.add_argument("--milp-tables", type=int, nargs="*", default=[26, 1000], help="synthetic MILP sizes (none: skip)")
    parser.add_argument("--milp-world-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--milp-time-limit", type=float, default=60.0)
    parser.add_argument("--milp-only", action="store_true",
                        help="with --from-json: measure the MILP's timings again into that file, keep its variants'")
    parser.add_argument("--milp-fast-share", type=float, default=0.1, help="synthetic DRAM budget, share of the rows' bytes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=REPO / ".bench_tiered",
                        help="tier files, plans and the tier model's JSON (a real filesystem, not tmpfs)")
    parser.add_argument("--no-cgroup", action="store_true", help="run the variants without a memory limit")
    parser.add_argument("--markdown", type=Path, help="update this page's bench_tiered section")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--from-json", type=Path, help="render an earlier run's --json")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def run(args, argv: Sequence[str], load) -> Dict:
    from dist_rec.planner.tiers import TierModel

    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        raise SystemExit("Invalid --steps / --warmup / --batch: need steps >= 1, warmup >= 0, batch >= 1.")
    if args.zipf <= 1.0:
        raise SystemExit(f"Invalid --zipf {args.zipf}: numpy's Zipf law needs an exponent > 1.")
    if not args.no_cgroup and not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
        raise SystemExit(f"No cgroup-v1 memory controller at {CGROUP_ROOT}: run as root there, or pass --no-cgroup.")
    directory = args.dir.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / ".gitignore").exists():
        (directory / ".gitignore").write_text("*\n")  # scratch: never part of the repository
    tiers = TierModel.load_or_calibrate(directory / "tiers.json", directory=directory)
    print(tiers, flush=True)
    started = time.perf_counter()
    try:
        prepared = prepare(args, directory, tiers)
        milp = milp_timings(args, tiers) if args.milp_tables else []
        results = {}
        for k, variant in enumerate(args.variants):
            print(f"\n== variant {k + 1}/{len(args.variants)}: {variant} ({time.perf_counter() - started:.0f} s so far)",
                  flush=True)  # fmt: skip
            results[variant] = run_variant(variant, args, directory, prepared)
    finally:
        for leftover in ("plan", "batches.npz", *VARIANTS):
            path = directory / leftover
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        for variant in VARIANTS:
            for suffix in ("config", "result"):
                (directory / f"{variant}.{suffix}.json").unlink(missing_ok=True)
    prepared.pop("orders")
    return {
        "argv": list(argv), "load": load, "machine": machine_summary(), "args": {k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()}, "tiers": {t.name: t.details for t in tiers.tiers}, "prepared": prepared,
        "variants": results, "milp": milp, "wall_s": time.perf_counter() - started,
        "read_ahead_kb": _read_ahead_kb(directory),
    }  # fmt: skip


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.worker:
        worker(args)
        return
    shown = list(argv if argv is not None else sys.argv[1:])
    if args.from_json:  # the run's own command line, machine and load are what the page quotes
        data = json.loads(args.from_json.read_text())
        if args.milp_only:  # the MILP's timings measured again; the variants' figures stay the run's
            from dist_rec.planner.tiers import TierModel

            tiers = TierModel.load_or_calibrate(args.dir.resolve() / "tiers.json", directory=args.dir.resolve())
            for key in ("milp_tables", "milp_world_sizes", "milp_time_limit", "milp_fast_share", "milp_grid", "seed"):
                data["args"][key] = getattr(args, key)
            data["milp"], data["milp_argv"] = milp_timings(args, tiers), shown
            write_json(args.from_json, data, indent=1, default=float)
    else:
        load = warn_if_busy()
        data = run(args, shown, load)
    text = _markdown(data)
    print("\n" + text)
    if args.json and not args.from_json:
        write_json(args.json, data, indent=1, default=float)
    if args.markdown:
        update_section(args.markdown, "bench_tiered", text)


if __name__ == "__main__":
    main()
