"""The true ceiling of the embedding step on this machine, and dist_rec's
share of it.

PyTorch's own gathers are not a ceiling: dist_rec's step already "reached"
109% of them. This measures the machine itself with native loops
(``native/row_ceiling.cpp``, built here with ``g++ -O3 -march=native
-fopenmp``): sums kept in registers as wide as the CPU's vectors (AVX-512,
else AVX2 or AVX, else 16 bytes), rows prefetched ahead, huge-page tables,
every core.

* **read**: pool every bag of a batch (each id's row read once), as a
  forward does;
* **read-modify-write**: each of the batch's unique rows of each table
  read, changed and written back once (sorted, as the fused update walks
  them), as an update does;
* **read-modify-write with state**: the same, each row's float of
  optimizer state too (row-wise AdaGrad's: the fused step must read and
  write it, one more cache line per row at random), so that the table
  says how much of the gap to the step is the state's;

each at prefetch distances 0, 8, 16, 32 and 64 ids and with each
prefetch hint (into L1, into L2, prefetcht2, for writing), keeping the best. For the
benchmark's standard configs (bench_embedding.py's batches: Poisson(20) ids
per bag, Zipf 1.05 or uniform) the ceiling of a forward is the read time of
its N ids, and of a step the read time plus the read-modify-write time of
its U unique rows; dist_rec's forward and step (its
``EmbeddingBagCollection`` with the fused row-wise AdaGrad) are reported as
a share of them: ceiling time / dist_rec's time. Ceiling and dist_rec
alternate in rounds in one process.

    python benchmarks/bench_ceiling.py --markdown docs/benchmarks.md
    python benchmarks/bench_ceiling.py --dims 64 --batch-sizes 2048 --rounds 2
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from harness import (
    REPO, busy_note, command_line, machine_summary, markdown_table, median_seconds, update_section, warn_if_busy,
)

sys.path.insert(0, str(REPO))

SOURCE = Path(__file__).resolve().parent / "native" / "row_ceiling.cpp"
DISTANCES = (0, 8, 16, 32, 64)
HINTS = {"t0": 0, "t1": 1, "w": 2, "t2": 3}  # prefetch into L1, into L2, for writing; prefetcht2


def _build_host() -> str:
    compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{compiler}\n{flags}\n{os.uname().machine}"


def load_native() -> ctypes.CDLL:
    """``row_ceiling.cpp`` built for this machine, cached by the hash of the
    source, the compiler and the CPU's flags (``-march=native``: a cache
    shared with another machine must not hand over its build)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + _build_host().encode()).hexdigest()[:16]
    cache = Path.home() / ".cache" / "dist_rec"
    cache.mkdir(parents=True, exist_ok=True)
    library = cache / f"row_ceiling-{digest}.so"
    if not library.exists():
        partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")  # (renamed into place: builders may race)
        command = ["g++", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(partial), str(SOURCE)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"Building {SOURCE} failed ({' '.join(command)}):\n{done.stderr}")
        partial.rename(library)
    native = ctypes.CDLL(str(library))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    native.pooled_read.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, i64, ctypes.c_int]
    native.update_rows.argtypes = [ptr, ptr, i64, ptr, ptr, i64, ctypes.c_float, ctypes.c_float, i64, ctypes.c_int]
    native.ceiling_isa.restype = ctypes.c_char_p
    return native


def _pointers(tables: List[torch.Tensor]):
    return (ctypes.c_void_p * len(tables))(*[t.data_ptr() for t in tables])


def pooled_read(native, tables: List[torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor, batch: int, distance: int,
                out: torch.Tensor, hint: str = "t0") -> None:  # fmt: skip
    """``out[bag] = sum of the rows of its ids`` (bags table-major, ``batch`` a table)."""
    num_bags = offsets.numel() - 1
    code = native.pooled_read(_pointers(tables), tables[0].shape[1], ids.data_ptr(), offsets.data_ptr(), num_bags, batch,
                              out.data_ptr(), distance, HINTS[hint])  # fmt: skip
    if code:
        raise ValueError(f"row_ceiling.cpp has no loop for dim {tables[0].shape[1]} (16, 32, 64, 128, 256)")


def update_rows(native, tables: List[torch.Tensor], rows: torch.Tensor, starts: torch.Tensor, a: float, b: float,
                distance: int, hint: str = "w", states: Optional[List[torch.Tensor]] = None) -> None:  # fmt: skip
    """Rows ``rows[starts[t]:starts[t + 1]]`` of table t (each once): ``r = r * a + b``;
    with ``states`` (a float per row of each table), also ``states[t][r] = s * a + b``."""
    if states is not None and (
        [s.shape for s in states] != [t.shape[:1] for t in tables]
        or any(s.dtype != torch.float32 or not s.is_contiguous() for s in states)
    ):
        raise ValueError(
            "states must hold one contiguous float32 per row of each table; got "
            f"{[(tuple(s.shape), s.dtype) for s in states]} for tables of {[t.shape[0] for t in tables]} rows"
        )
    code = native.update_rows(_pointers(tables), _pointers(states) if states is not None else None,
                              tables[0].shape[1], rows.data_ptr(), starts.data_ptr(), len(tables),
                              a, b, distance, HINTS[hint])  # fmt: skip
    if code:
        raise ValueError(f"row_ceiling.cpp has no loop for dim {tables[0].shape[1]} (16, 32, 64, 128, 256)")


def _unique_per_table(config, batch) -> tuple:
    per_table = batch["indices"].split(batch["lengths"].view(config.tables, config.batch_size).sum(1).tolist())
    uniques = [torch.unique(ids) for ids in per_table]  # sorted
    starts = torch.zeros(config.tables + 1, dtype=torch.int64)
    starts[1:] = torch.cumsum(torch.tensor([u.numel() for u in uniques]), 0)
    return torch.cat(uniques), starts


def measure_ceiling(native, config, tables, states, batches, steps: int, warmup: int) -> Dict:
    """Best-of-distances median seconds per batch: reading its ids,
    read-modify-writing its unique rows, and the same with each row's
    optimizer state (``states``: a float per row, as row-wise AdaGrad
    keeps; each swept over distances and hints on its own)."""
    from bench_embedding import NUM_BATCHES

    out = torch.empty(config.tables * config.batch_size, config.dim)
    unique = [_unique_per_table(config, b) for b in batches]
    read, rmw, rmw_state = {}, {}, {}
    for distance in DISTANCES:
        for hint in ("t0", "t1", "t2") if distance else ("t0",):
            read[(distance, hint)] = median_seconds(
                lambda i: pooled_read(native, tables, batches[i % NUM_BATCHES]["indices"],
                                      batches[i % NUM_BATCHES]["offsets"], config.batch_size, distance, out, hint),
                steps, warmup)  # fmt: skip
        for hint in ("w", "t0", "t1", "t2") if distance else ("w",):
            # r * 1 + 0: the rows keep their values (bit for bit), so every round reads the same tables.
            for times, with_states in ((rmw, None), (rmw_state, states)):
                times[(distance, hint)] = median_seconds(
                    lambda i: update_rows(native, tables, *unique[i % NUM_BATCHES], 1.0, 0.0, distance, hint, with_states),
                    steps, warmup)  # fmt: skip
    best_read, best_rmw, best_state = min(read, key=read.get), min(rmw, key=rmw.get), min(rmw_state, key=rmw_state.get)
    return {"read_s": read[best_read], "rmw_s": rmw[best_rmw], "rmw_state_s": rmw_state[best_state],
            "read_distance": best_read, "rmw_distance": best_rmw, "rmw_state_distance": best_state}  # fmt: skip


def measure_dist_rec(config, batches, steps: int, warmup: int) -> Dict:
    from bench_embedding import time_variant

    result = time_variant("dist_rec", config, batches, steps, warmup)
    return {"step_s": result["step_ms"] / 1e3, "forward_s": result["forward_ms"] / 1e3}


def run(args) -> List[Dict]:
    from bench_embedding import PRESETS, Config, init_weight, make_batches, unique_rows

    from dist_rec.ops import empty_hugepage

    native = load_native()
    preset = PRESETS["standard"]
    results = []
    for dim in args.dims or preset["dims"]:
        for batch_size in args.batch_sizes or preset["batch_sizes"]:
            for distribution in args.distributions or preset["distributions"]:
                config = Config(args.tables, args.rows, dim, batch_size, distribution, 20.0, 1.05)
                batches = make_batches(config)
                tables = [empty_hugepage((config.rows, dim), torch.float32).copy_(init_weight(config, t))
                          for t in range(config.tables)]  # fmt: skip
                states = [empty_hugepage((config.rows,), torch.float32).fill_(1.0) for _ in range(config.tables)]
                rounds = []
                for r in range(args.rounds):
                    order = ["ceiling", "dist_rec"] if r % 2 == 0 else ["dist_rec", "ceiling"]
                    figures = {}
                    for name in order:
                        if name == "ceiling":
                            figures.update(measure_ceiling(native, config, tables, states, batches, args.steps, args.warmup))
                        else:
                            figures.update(measure_dist_rec(config, batches, args.steps, args.warmup))
                    rounds.append(figures)
                    print(f"[{config.label()} round {r + 1}] ceiling read {1e3 * figures['read_s']:.1f} ms "
                          f"{figures['read_distance']} + rmw {1e3 * figures['rmw_s']:.1f} ms {figures['rmw_distance']} "
                          f"(with state {1e3 * figures['rmw_state_s']:.1f} ms {figures['rmw_state_distance']}); dist_rec forward {1e3 * figures['forward_s']:.1f} ms, "
                          f"step {1e3 * figures['step_s']:.1f} ms", flush=True)  # fmt: skip
                n = statistics.mean(int(b["indices"].numel()) for b in batches)
                u = statistics.mean(unique_rows(config, b) for b in batches)
                med = {k: statistics.median(r[k] for r in rounds) for k in ("read_s", "rmw_s", "rmw_state_s", "forward_s", "step_s")}
                results.append(dict(config=config.label(), ids=n, unique=u, row_bytes=dim * 4, threads=native.ceiling_threads(),
                                    isa=native.ceiling_isa().decode(),
                                    read_distance=rounds[0]["read_distance"], rmw_distance=rounds[0]["rmw_distance"],
                                    rmw_state_distance=rounds[0]["rmw_state_distance"],
                                    rounds=rounds, **med))  # fmt: skip
                del tables, states
    return results


def markdown(results: List[Dict], argv, load) -> str:
    rows = []
    for r in results:
        read_gbps = r["ids"] * r["row_bytes"] / r["read_s"] / 1e9
        rmw_gbps = 2 * r["unique"] * r["row_bytes"] / r["rmw_s"] / 1e9
        ceiling_step = r["read_s"] + r["rmw_s"]
        rows.append([r["config"], f"{r['ids'] / 1e6:.2f}M / {r['unique'] / 1e6:.2f}M", f"{1e3 * r['read_s']:.1f}",
                     f"{read_gbps:.1f}", f"{1e3 * r['rmw_s']:.1f}", f"{rmw_gbps:.1f}", f"{1e3 * r['rmw_state_s']:.1f}",
                     f"{1e3 * r['forward_s']:.1f}", f"**{r['read_s'] / r['forward_s']:.0%}**", f"{1e3 * r['step_s']:.1f}",
                     f"**{ceiling_step / r['step_s']:.0%}**",
                     f"{(r['read_s'] + r['rmw_state_s']) / r['step_s']:.0%}"])  # fmt: skip
    return "\n".join([
        "## The true ceiling of the embedding step (CPU, bench_ceiling.py)", "",
        f"`{command_line(__file__, argv)}`", "", f"{machine_summary()}.{busy_note(load)}", "",
        "Native loops (benchmarks/native/row_ceiling.cpp, `g++ -O3 -march=native -fopenmp`, "
        f"{results[0]['threads'] if results else '?'} threads): {results[0]['isa'] if results else '?'} sums in registers, "
        "rows prefetched ahead "
        "(the best of 0, 8, 16, 32 and 64 ids ahead, into L1, into L2, prefetcht2 or for writing), huge-page tables. "
        "Read: every id's row of a batch pooled into its bag. "
        "Read-modify-write: every unique row of each table read, changed and written once, in sorted order. The "
        "ceiling of a forward is the read time of its N ids; of a step, that plus the read-modify-write time of its U "
        "unique rows. dist_rec's share = ceiling time / dist_rec's time (medians of the rounds; ceiling and dist_rec "
        "alternated in one process). GB/s: rows read (read), rows read and written (read-modify-write). "
        "\"rmw + state\": the same read-modify-write that also reads and writes each row's float of optimizer state "
        "(row-wise AdaGrad's, which the fused step must update: one more cache line per row, at random), and the "
        "step's share of the ceiling built on it.", "",
        markdown_table(["config", "ids N / unique U", "read ms", "read GB/s", "rmw ms", "rmw GB/s", "rmw + state ms",
                        "dist_rec forward ms", "forward / ceiling", "dist_rec step ms", "step / ceiling",
                        "step / ceiling with state"], rows),  # fmt: skip
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, nargs="+")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--distributions", nargs="+", choices=["zipf", "uniform"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    load = warn_if_busy()
    results = run(args)
    text = markdown(results, argv if argv is not None else sys.argv[1:], load)
    print(text)
    if args.markdown:
        update_section(args.markdown, "bench_ceiling", text)


if __name__ == "__main__":
    main()
