"""What every ``benchmarks/bench_*.py`` shares: workers, rounds, medians, the
machine line and the benchmark page's sections.

The scripts run as ``python benchmarks/bench_x.py``: Python puts this
directory first on ``sys.path``, so they import this module as ``from
harness import ...``. Importing it also puts the repository root ahead of an
installed dist_rec, so that a checkout measures its own build; its workers
do the same (spawned ranks inherit ``sys.path``, worker processes run the
same script and import this module again).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Above this 1-minute load average another job shares the cores: the run is flagged.
BUSY_LOAD_AVERAGE = 0.5


# ---------------------------------------------------------------------------
# Workers: one variant in a fresh process, or in spawned gloo ranks
# ---------------------------------------------------------------------------


class WorkerFailed(SystemExit):
    """A worker process or rank failed. Ends the benchmark with the worker's
    own error output: its traceback is the one that matters, the driver's
    says nothing more."""


def run_worker_process(script: Path | str, args: Sequence[str], *, label: str, thp: bool = False) -> dict:
    """Runs ``python script *args --result FILE`` in a fresh process and
    returns the JSON the worker wrote to ``FILE`` (``write_worker_result``).

    A fresh process per variant and round gives each variant its own memory
    (no allocator or cache state left by the previous one) and its own
    environment: ``THP_MEM_ALLOC_ENABLE`` (torch's CPU allocator on
    transparent huge pages) is set when ``thp``, removed otherwise.
    """
    env = dict(os.environ)
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, str(script), *args, "--result", result.name]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise WorkerFailed(f"worker {label} failed (exit {proc.returncode}):\n{proc.stderr[-8000:]}")
        return json.loads(Path(result.name).read_text())


def write_json(path: Path | str, data: Any, **dumps_kwargs) -> None:
    """``data`` as JSON at ``path``, its folder created (``runs/`` is not in a
    fresh clone: a run of half an hour once lost its figures to that) and the
    file renamed into place, so that an earlier file is never half
    overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, **dumps_kwargs)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(text)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_worker_result(path: Path | str, result: dict) -> None:
    """The worker's side of ``run_worker_process``: its result, as JSON."""
    Path(path).write_text(json.dumps(result))


def run_ranks(
    fn: Callable[..., Any], world_size: int, timeout: float, *, label: Optional[str] = None, pin: bool = False,
    keep_freed_memory: bool = False, **kwargs: Any,
) -> List[Any]:
    """Runs ``fn(rank, world_size, **kwargs)`` on ``world_size`` spawned gloo
    ranks (``dist_rec.testing.multi_process``) and returns what each rank
    returned (JSON-able values, None where a rank returned nothing), in rank
    order. ``pin``: each rank first pinned to its own block of the cores, as
    the trainer pins a torchrun process (``train.pin_cores``);
    ``keep_freed_memory``: its allocator set up as the trainer sets it
    (``train.keep_freed_memory``).

    A spawned rank cannot hand a value back to the driver: each writes its
    result as JSON into a temporary directory, read here once all are done.
    ``fn`` must be a module-level function of the script (ranks are spawned).
    """
    from dist_rec.testing.multi_process import run_multi_process

    with tempfile.TemporaryDirectory() as result_dir:
        try:
            run_multi_process(
                _rank_entry, world_size=world_size, timeout=timeout, rank_fn=fn, result_dir=result_dir,
                rank_kwargs=kwargs, pin=pin, keep_freed_memory=keep_freed_memory,
            )  # fmt: skip
        except AssertionError as error:
            raise WorkerFailed(f"{label or fn.__name__} on {world_size} processes failed:\n{error}") from None
        paths = [Path(result_dir, f"rank{rank}.json") for rank in range(world_size)]
        return [json.loads(path.read_text()) if path.exists() else None for path in paths]


def _rank_entry(
    rank: int, world_size: int, rank_fn: Callable, result_dir: str, rank_kwargs: dict, pin: bool = False,
    keep_freed_memory: bool = False,
) -> None:
    if pin:
        from dist_rec.trainer.environment import pin_to_cores

        pin_to_cores(rank, world_size)
    if keep_freed_memory:
        from dist_rec.trainer import environment

        if not environment.keep_freed_memory():
            raise RuntimeError("keep_freed_memory changed nothing here (not glibc, or allocator settings of your own)")
    result = rank_fn(rank, world_size, **rank_kwargs)
    if result is not None:
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------


def round_order(items: Sequence, round_index: int, order: str = "alternate") -> list:
    """The variants' order in round ``round_index``. ``"alternate"``: as
    given in even rounds, reversed in odd ones, so that a drift of a shared
    machine's speed (or one variant's after-effects on the next) falls on
    every variant alike over two rounds. ``"fixed"``: the same order every
    round (scripts whose published figures were measured that way)."""
    if order == "alternate":
        return list(items) if round_index % 2 == 0 else list(items)[::-1]
    if order == "fixed":
        return list(items)
    raise ValueError(f"Invalid order={order!r}. Must be 'alternate' or 'fixed'.")


def rotated(items: Sequence, shift: int) -> list:
    """``items`` starting at position ``shift`` (mod its length): variants
    interleaved step by step inside one process each take every position in
    turn, so none always runs right after the same other one."""
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def run_rounds(
    variants: Sequence[Hashable], rounds: int, measure: Callable[[Any, int], dict], order: str = "alternate"
) -> Dict[Any, List[dict]]:
    """Calls ``measure(variant, round_index)`` for every variant in each of
    ``rounds`` rounds (in ``round_order``); returns ``{variant: [result of
    round 0, round 1, ...]}`` in the order of ``variants``."""
    results: Dict[Any, List[dict]] = {variant: [] for variant in variants}
    for r in range(rounds):
        for variant in round_order(variants, r, order):
            results[variant].append(measure(variant, r))
    return results


# ---------------------------------------------------------------------------
# Medians and ratios
# ---------------------------------------------------------------------------


def median_seconds(fn: Callable[[int], Any], steps: int, warmup: int) -> float:
    """Median wall time of ``fn(i)`` over ``steps`` calls, after ``warmup``
    untimed ones (``i`` counts every call from 0)."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn(i)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_fields(results: Sequence[dict]) -> dict:
    """The first result with each numeric field replaced by its median over
    all ``results``: a figure over rounds is the median of the per-round
    figures, which one disturbed round does not move."""
    merged = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)):
            merged[key] = statistics.median(r[key] for r in results)
    return merged


def per_round_ratios(results: Sequence[dict], baseline: Sequence[dict], key: str = "step_ms") -> List[float]:
    """``results[i][key] / baseline[i][key]`` for each round ``i``: the two
    figures of one round met the same machine, so their ratio is steadier
    than the ratio of two medians."""
    return [r[key] / b[key] for r, b in zip(results, baseline)]


def spread(values: Iterable[float]) -> Tuple[float, float, float]:
    """``(median, min, max)``: a figure and how far its rounds strayed."""
    values = list(values)
    return statistics.median(values), min(values), max(values)


def ratio_cell(ratios: Optional[Sequence[float]], digits: int = 2, count_rounds: bool = True) -> str:
    """A table cell for per-round ratios: ``**1.23x** (1.10-1.40, 5
    rounds)``, the median in bold, then the min-max spread; ``-`` without
    ratios."""
    if not ratios:
        return "-"
    mid, lo, hi = spread(ratios)
    rounds = f", {len(ratios)} rounds" if count_rounds else ""
    return f"**{mid:.{digits}f}x** ({lo:.{digits}f}-{hi:.{digits}f}{rounds})"


# ---------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------


def package_version(name: str) -> str:
    """An installed distribution's version, or ``unknown``."""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "unknown"


def machine_summary(torchrec: bool = False) -> str:
    """``CPU model, N cores, THP `setting`, torch X, fbgemm_gpu Y`` (and
    ``torchrec Z`` when asked): what moves these CPU figures most, printed
    with every table so that a reader can tell whether two are comparable."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    thp = "unknown"
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        pass
    versions = [f"torch {torch.__version__}"]
    try:
        import fbgemm_gpu

        versions.append(f"fbgemm_gpu {fbgemm_gpu.__version__}")
    except ImportError:
        pass
    summary = f"{cpu}, {os.cpu_count()} cores, THP `{thp}`, {', '.join(versions)}"
    return f"{summary}, torchrec {package_version('torchrec')}" if torchrec else summary


def load_average() -> List[float]:
    """The 1, 5 and 15-minute load averages."""
    return list(os.getloadavg())


def warn_if_busy(threads: Optional[int] = None) -> List[float]:
    """Warns when other processes hold the cores (a busy machine makes steps
    slower, and unevenly so between variants); returns the load averages for
    the report (``busy_note``). With ``threads``, only when that many
    threads would need every core."""
    load = load_average()
    if load[0] <= BUSY_LOAD_AVERAGE:
        return load
    if threads is None:
        print(
            f"warning: load average {load[0]:.1f} before starting; timings are only meaningful on an idle machine",
            flush=True,
        )
    elif threads >= (os.cpu_count() or 1):
        print(
            f"warning: load average {load[0]:.1f} before starting; timings with {threads} threads on "
            f"{os.cpu_count()} cores are only meaningful on an otherwise idle machine",
            flush=True,
        )
    return load


def busy_note(load: Sequence[float]) -> str:
    """The sentence a report carries after its machine line when the run
    started on a busy machine; empty otherwise."""
    if load[0] > BUSY_LOAD_AVERAGE:
        return f" **The machine was busy (load average {load[0]:.1f} at the start): indicative numbers only.**"
    return ""


# ---------------------------------------------------------------------------
# The benchmark page
# ---------------------------------------------------------------------------


def command_line(script: Path | str, argv: Optional[Sequence[str]] = None) -> str:
    """How the script was run, as the page quotes it: ``python
    benchmarks/<script> <arguments>`` (``argv``: the arguments given to
    ``main``, else the command line's)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script).name}", *args])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: the header row, its ``|---|`` rule, one line per row."""

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def update_section(path: Path, name: str, text: str) -> None:
    """Replaces the text between ``<!-- name:begin -->`` and ``<!-- name:end
    -->`` in ``path`` (appending the section when absent, creating the page
    when missing), keeping every other section: each script rewrites only
    its own part of docs/benchmarks.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    page = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in page and end in page:
        page = page[: page.index(begin)] + block + page[page.index(end) + len(end) + 1 :]
    else:
        page = page.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    print(f"\nwrote the {name} section of {path}")
