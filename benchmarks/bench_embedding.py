"""One training step of pooled embedding tables: dist_rec against its peers.

For each configuration (tables x rows x dim, batch size, id distribution)
this times, side by side on the same data:

* ``dist_rec``   EmbeddingBagCollection with the fused row-wise AdaGrad;
* ``tbe``        FBGEMM's SplitTableBatchedEmbeddingBagsCodegen (CPU,
                 EXACT_ROWWISE_ADAGRAD) as shipped;
* ``tbe_thp``    the same with THP_MEM_ALLOC_ENABLE=1 (torch's allocator on
                 transparent huge pages);
* ``torch``      one nn.EmbeddingBag per table (sparse gradients) plus a
                 hand-written row-wise AdaGrad;

and the machine's random-row-gather ceiling: the best rate (GB/s of rows
read) of PyTorch's own gathers (``index_select`` and ``F.embedding_bag``)
over the same ids on huge-page tables, using every core.

Each variant runs in its own process (fresh memory, its own environment).
A step is forward + backward + optimizer; medians over ``--steps`` steps
after ``--warmup``, batches rotating over 4 pre-generated ones. The
variants take turns for ``--rounds`` rounds and each figure is the median of
its rounds, so that drift in a shared machine's speed falls on all of them. "Effective
GB/s" of a step counts the rows it must move: N rows read by the forward,
and each of the U unique rows read and written once by the update.

Usage::

    python benchmarks/bench_embedding.py --preset standard --markdown docs/benchmarks.md
    python benchmarks/bench_embedding.py --preset small
    python benchmarks/bench_embedding.py --tables 8 --rows 1000000 --dims 128 --batch-sizes 2048 --distributions zipf
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from harness import (
    command_line, machine_summary, markdown_table, median_fields, run_rounds, run_worker_process, update_section,
    write_json, write_worker_result,
)  # fmt: skip

PRESETS = {
    # The configuration the foundation issue asks for: 8 x 1M rows, fp32.
    "standard": dict(tables=8, rows=1_000_000, dims=[128, 64], batch_sizes=[2048, 8192], distributions=["zipf", "uniform"]),
    # A minute-long run for the README's main job.
    "small": dict(tables=4, rows=200_000, dims=[64], batch_sizes=[1024], distributions=["zipf", "uniform"], rounds=1),
}
VARIANTS = ["dist_rec", "tbe", "tbe_thp", "torch"]
NUM_BATCHES = 4
LEARNING_RATE = 0.01
EPS = 1e-8


@dataclass
class Config:
    tables: int
    rows: int
    dim: int
    batch_size: int
    distribution: str
    pooling_factor: float
    zipf_alpha: float

    def label(self) -> str:
        return f"{self.tables}x{self.rows:,}x{self.dim} B={self.batch_size} {self.distribution}"


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def zipf_ids(rng: np.random.Generator, rows: int, alpha: float, n: int) -> np.ndarray:
    """Truncated Zipf(alpha) over rows, hot ranks scattered by a permutation
    (as hashing scatters real hot ids)."""
    weights = 1.0 / np.arange(1, rows + 1, dtype=np.float64) ** alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(n), side="right")
    return rng.permutation(rows)[np.minimum(ranks, rows - 1)]


def make_batches(config: Config, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(NUM_BATCHES):
        lengths = rng.poisson(config.pooling_factor, size=config.tables * config.batch_size)
        ids = []
        for t in range(config.tables):
            n = int(lengths[t * config.batch_size : (t + 1) * config.batch_size].sum())
            if config.distribution == "zipf":
                ids.append(zipf_ids(rng, config.rows, config.zipf_alpha, n))
            else:
                ids.append(rng.integers(0, config.rows, n))
        lengths_t = torch.from_numpy(lengths).to(torch.int64)
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(lengths_t, 0, out=offsets[1:])
        indices = torch.from_numpy(np.concatenate(ids)).to(torch.int64)
        per_table = []
        for t in range(config.tables):
            table_offsets = offsets[t * config.batch_size : (t + 1) * config.batch_size + 1]
            start, end = int(table_offsets[0]), int(table_offsets[-1])
            per_table.append((indices[start:end], table_offsets - start))
        batches.append(
            dict(
                indices=indices,
                lengths=lengths_t,
                offsets=offsets,
                per_table=per_table,
                grad=torch.randn(config.batch_size, config.tables * config.dim, generator=torch.Generator().manual_seed(seed)),
            )
        )
    return batches


def unique_rows(config: Config, batch: Dict[str, torch.Tensor]) -> int:
    """Rows one step's update touches (per table, summed)."""
    total = 0
    per_table = batch["indices"].split(
        batch["lengths"].view(config.tables, config.batch_size).sum(1).tolist()
    )
    for ids in per_table:
        total += int(torch.unique(ids).numel())
    return total


# ---------------------------------------------------------------------------
# Variants (each runs in a worker process)
# ---------------------------------------------------------------------------


def init_weight(config: Config, t: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(t)
    bound = (1.0 / config.rows) ** 0.5
    return torch.empty(config.rows, config.dim, device=device).uniform_(-bound, bound, generator=g)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def build_dist_rec(config: Config, device: str = "cpu", dtype: str = "fp32"):
    from dist_rec import DataType, EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from dist_rec.optim import RowWiseAdagrad

    keys = [f"f{t}" for t in range(config.tables)]
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t{t}",
                embedding_dim=config.dim,
                num_embeddings=config.rows,
                feature_names=[keys[t]],
                data_type=DataType.FP16 if dtype == "fp16" else DataType.FP32,
            )
            for t in range(config.tables)
        ],
        optimizer=RowWiseAdagrad(lr=LEARNING_RATE, eps=EPS),
        device=device,
    )
    for t in range(config.tables):
        ebc.storage.write_block(t, 0, init_weight(config, t, device))

    def forward(batch):
        kjt = KeyedJaggedTensor(keys, batch["indices"], lengths=batch["lengths"], offsets=batch["offsets"])
        return ebc(kjt).values()

    return forward, lambda out, batch: out.backward(batch["grad"])


def build_tbe(config: Config):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
    from fbgemm_gpu.tbe.config.embedding_config import ComputeDevice

    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(config.rows, config.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * config.tables,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=LEARNING_RATE,
        eps=EPS,
        pooling_mode=PoolingMode.SUM,
        weights_precision=SparseType.FP32,
        output_dtype=SparseType.FP32,
    )
    with torch.no_grad():
        for t, w in enumerate(tbe.split_embedding_weights()):
            w.copy_(init_weight(config, t))
    return (lambda batch: tbe(batch["indices"], batch["offsets"])), (lambda out, batch: out.backward(batch["grad"]))


def build_torch(config: Config, device: str = "cpu", dtype: str = "fp32"):
    bags = [
        torch.nn.EmbeddingBag(
            config.rows,
            config.dim,
            mode="sum",
            sparse=True,
            include_last_offset=True,
            _weight=init_weight(config, t, device).to(dtype=DTYPES[dtype]),
        )
        for t in range(config.tables)
    ]
    momentum = [torch.zeros(config.rows, device=device) for _ in range(config.tables)]

    def forward(batch):
        outs = []
        for t, bag in enumerate(bags):
            ids, offsets = batch["per_table"][t]
            outs.append(bag(ids, offsets).float())
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def rowwise_adagrad(weight, state):
        grad = weight.grad.coalesce()
        rows, values = grad.indices()[0], grad.values().float()
        state.index_add_(0, rows, values.pow(2).mean(dim=1))
        step = values / (state[rows].sqrt() + EPS)[:, None] * -LEARNING_RATE
        weight.index_add_(0, rows, step.to(weight.dtype))
        weight.grad = None

    def backward(out, batch):
        out.backward(batch["grad"])
        for bag, state in zip(bags, momentum):
            rowwise_adagrad(bag.weight, state)

    return forward, backward


BUILDERS = {"dist_rec": build_dist_rec, "tbe": build_tbe, "tbe_thp": build_tbe, "torch": build_torch}


def time_variant(variant: str, config: Config, batches, steps: int, warmup: int) -> dict:
    forward, backward = BUILDERS[variant](config)
    step_ms, forward_ms = [], []
    for i in range(warmup + steps):
        batch = batches[i % NUM_BATCHES]
        t0 = time.perf_counter()
        out = forward(batch)
        backward(out, batch)
        t2 = time.perf_counter()
        if i >= warmup:
            step_ms.append((t2 - t0) * 1e3)
    with torch.no_grad():
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            forward(batches[i % NUM_BATCHES])
            if i >= warmup:
                forward_ms.append((time.perf_counter() - t0) * 1e3)
    result = dict(step_ms=statistics.median(step_ms), forward_ms=statistics.median(forward_ms))
    if variant == "dist_rec":
        result["range_check_cost"] = range_check_cost(forward, batches, steps, warmup)
    return result


def range_check_cost(forward, batches, steps: int, warmup: int) -> float:
    """Relative cost of the id range check (on by default): forwards with it
    on and off (an unsafe testing switch) in alternating blocks, each call on
    the next batch in rotation so that no call finds the previous one's rows
    in cache; the ratio of the two medians, minus one."""
    from dist_rec.ops import set_index_checks

    times = {True: [], False: []}
    call = 0
    with torch.no_grad():
        try:
            for block in range(6):
                for checks in (True, False) if block % 2 == 0 else (False, True):
                    set_index_checks(checks)
                    for i in range(warmup + steps):
                        t0 = time.perf_counter()
                        forward(batches[call % NUM_BATCHES])
                        call += 1
                        if i >= warmup:
                            times[checks].append(time.perf_counter() - t0)
        finally:
            set_index_checks(True)
    return statistics.median(times[True]) / statistics.median(times[False]) - 1.0


def time_gather_ceiling(config: Config, batches, steps: int, warmup: int) -> dict:
    """GB/s of rows read by the best of PyTorch's gathers, huge-page tables."""
    from dist_rec.ops import empty_hugepage

    tables = [empty_hugepage((config.rows, config.dim), torch.float32).copy_(init_weight(config, t)) for t in range(config.tables)]
    rates = {}
    for method in ("index_select", "embedding_bag"):
        times = []
        for i in range(warmup + steps):
            batch = batches[i % NUM_BATCHES]
            per_table = batch["lengths"].view(config.tables, config.batch_size).sum(1).tolist()
            ids = batch["indices"].split(per_table)
            if method == "index_select":
                outs = [torch.empty(len(x), config.dim) for x in ids]
            offsets = [
                batch["offsets"][t * config.batch_size : (t + 1) * config.batch_size + 1] - batch["offsets"][t * config.batch_size]
                for t in range(config.tables)
            ]
            t0 = time.perf_counter()
            for t in range(config.tables):
                if method == "index_select":
                    torch.index_select(tables[t], 0, ids[t], out=outs[t])
                else:
                    torch.nn.functional.embedding_bag(ids[t], tables[t], offsets[t], mode="sum", include_last_offset=True)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        rows_read = sum(len(b["indices"]) for b in batches) / NUM_BATCHES
        rates[method] = rows_read * config.dim * 4 / statistics.median(times) / 1e9
    return dict(gather_gbps=max(rates.values()), gather_by_method=rates)


def worker_main(args) -> None:
    config = Config(**json.loads(args.config))
    batches = torch.load(args.data)
    if args.worker == "ceiling":
        result = time_gather_ceiling(config, batches, args.steps, args.warmup)
    else:
        result = time_variant(args.worker, config, batches, args.steps, args.warmup)
    result["threads"] = torch.get_num_threads()
    write_worker_result(args.result, result)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def median_of_rounds(results: List[dict]) -> dict:
    """Each numeric figure's median over the rounds (other fields from round 1)."""
    return {**median_fields(results), "rounds": results}


def run_worker(name: str, config: Config, data: Path, steps: int, warmup: int) -> dict:
    args = ["--worker", name, "--config", json.dumps(asdict(config)), "--data", str(data)]
    args += ["--steps", str(steps), "--warmup", str(warmup)]
    return run_worker_process(__file__, args, label=f"{name} on {config.label()}", thp=name == "tbe_thp")


def format_table(rows: List[dict]) -> str:
    header = [
        "config", "dist_rec step ms", "TBE ms", "TBE+THP ms", "torch ms", "vs TBE", "vs TBE+THP", "vs torch",
        "fwd ms dist_rec / TBE / torch", "gather ceiling GB/s", "dist_rec step GB/s (of ceiling)",
        "TBE step GB/s (of ceiling)", "dist_rec fwd GB/s (of ceiling)", "range check cost",
    ]  # fmt: skip
    lines = []
    for r in rows:
        v = r["variants"]

        def ms(name, key="step_ms"):
            return f"{v[name][key]:.1f}" if name in v else "-"

        def ratio(name):
            return f"{v[name]['step_ms'] / v['dist_rec']['step_ms']:.2f}x" if name in v and "dist_rec" in v else "-"

        ceiling = r["ceiling"]["gather_gbps"]

        def step_gbps(name):
            if name not in v:
                return "-"
            gbps = r["step_bytes"] / (v[name]["step_ms"] * 1e-3) / 1e9
            return f"{gbps:.1f} ({gbps / ceiling:.0%})"

        fwd_gbps = r["forward_bytes"] / (v["dist_rec"]["forward_ms"] * 1e-3) / 1e9 if "dist_rec" in v else float("nan")
        check = f"{v['dist_rec']['range_check_cost']:+.1%}" if "dist_rec" in v else "-"
        forwards = f"{ms('dist_rec', 'forward_ms')} / {ms('tbe', 'forward_ms')} / {ms('torch', 'forward_ms')}"
        lines.append([
            r["label"], ms("dist_rec"), ms("tbe"), ms("tbe_thp"), ms("torch"), ratio("tbe"), ratio("tbe_thp"),
            ratio("torch"), forwards, f"{ceiling:.1f}", step_gbps("dist_rec"), step_gbps("tbe"),
            f"{fwd_gbps:.1f} ({fwd_gbps / ceiling:.0%})", check,
        ])  # fmt: skip
    return markdown_table(header, lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="table storage types (cuda; default fp32 fp16)")
    parser.add_argument("--tables", type=int)
    parser.add_argument("--rows", type=int)
    parser.add_argument("--dims", type=int, nargs="+")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--distributions", nargs="+", choices=["zipf", "uniform"])
    parser.add_argument("--pooling-factor", type=float, default=20.0, help="mean ids per bag (Poisson)")
    parser.add_argument("--zipf-alpha", type=float, default=1.05)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="turns each variant takes; figures are medians over rounds")
    parser.add_argument("--markdown", type=Path, help="write the table and how it was made to this file")
    parser.add_argument("--json", type=Path, help="write all measurements as JSON")
    # Internal: one variant in a worker process.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)

    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda requested but no CUDA device is available")
        return run_cuda(args)

    settings = dict(PRESETS[args.preset or "standard"])
    rounds = settings.pop("rounds", None)
    if rounds is not None and "--rounds" not in (argv if argv is not None else sys.argv):
        args.rounds = rounds
    for key in ("tables", "rows", "dims", "batch_sizes", "distributions"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if any(v.startswith("tbe") for v in args.variants):
        try:
            import fbgemm_gpu  # noqa: F401
        except ImportError:
            parser.error("variants tbe/tbe_thp need fbgemm-gpu-cpu (pip install --no-deps fbgemm-gpu-cpu==1.8.0)")

    configs = [
        Config(settings["tables"], settings["rows"], dim, batch, dist, args.pooling_factor, args.zipf_alpha)
        for dim in settings["dims"]
        for batch in settings["batch_sizes"]
        for dist in settings["distributions"]
    ]
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(configs):
            batches = make_batches(config)
            data = Path(tmp) / "batches.pt"
            torch.save(batches, data)
            n = sum(len(b["indices"]) for b in batches) / NUM_BATCHES
            u = sum(unique_rows(config, b) for b in batches) / NUM_BATCHES
            row = dict(
                label=config.label(),
                config=asdict(config),
                indices_per_step=n,
                unique_rows_per_step=u,
                forward_bytes=n * config.dim * 4,
                step_bytes=(n + 2 * u) * config.dim * 4,
                variants={},
            )

            def measure(name: str, r: int) -> dict:
                result = run_worker(name, config, data, args.steps, args.warmup)
                figure = (
                    f"gather {result['gather_gbps']:6.1f} GB/s"
                    if name == "ceiling"
                    else f"step {result['step_ms']:8.1f} ms  forward {result['forward_ms']:7.1f} ms"
                )
                print(
                    f"[{i + 1}/{len(configs)} round {r + 1}/{args.rounds} {time.time() - started:5.0f}s] "
                    f"{config.label():<36} {name:<9} {figure}",
                    flush=True,
                )
                return result

            # The same order every round, as the published figures were measured.
            rounds = run_rounds(["ceiling", *args.variants], args.rounds, measure, order="fixed")
            row["ceiling"] = median_of_rounds(rounds.pop("ceiling"))
            row["variants"] = {name: median_of_rounds(results) for name, results in rounds.items()}
            rows.append(row)

    table = format_table(rows)
    print()
    print(table)
    command = command_line(__file__, argv)
    if args.markdown:
        write_markdown(args.markdown, table, command, rows)
    if args.json:
        write_json(args.json, dict(machine=machine_summary(), command=command, rows=rows), indent=2)


def write_markdown(path: Path, table: str, command: str, rows: List[dict]) -> None:
    text = f"""## Embedding training step (CPU)

Machine: {machine_summary()}.

Command: `{command}` (each variant in its own process; medians of the timed
steps; ids Poisson({rows[0]['config']['pooling_factor']:g}) per bag; Zipf exponent {rows[0]['config']['zipf_alpha']}).

A step is forward + backward + row-wise AdaGrad update of every touched row.
"vs X" is X's median step time over dist_rec's (higher is better for
dist_rec). Step GB/s counts the rows a step must move (forward reads N rows,
the update reads and writes each of the U unique rows); the gather ceiling is
the best rate of PyTorch's own row gathers (`index_select`,
`F.embedding_bag`) on huge-page tables with every core. The range check cost
compares forwards with id checks on and off, in alternating blocks.

{table}
"""
    update_section(path, "cpu", text)


# ---------------------------------------------------------------------------
# GPU (--device cuda): dist_rec against nn.EmbeddingBag, in one process
# ---------------------------------------------------------------------------

CUDA_PRESET = dict(tables=8, rows=1_000_000, dims=[128], batch_sizes=[8192, 65536], distributions=["zipf", "uniform"])


def cuda_median_ms(fn, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy, bytes read plus bytes written per second."""
    source = torch.empty(1 << 29, dtype=torch.float32, device="cuda").uniform_()  # 2 GiB
    target = torch.empty_like(source)
    ms = cuda_median_ms(lambda i: target.copy_(source), steps=20, warmup=3)
    return 2 * source.numel() * 4 / (ms * 1e-3) / 1e9


def time_cuda_variant(build, config: Config, dtype: str, batches, steps: int, warmup: int) -> dict:
    """Median step and forward times of one variant, built on the GPU."""
    forward, backward = build(config, device="cuda", dtype=dtype)

    def step(i):
        batch = batches[i % NUM_BATCHES]
        backward(forward(batch), batch)

    def forward_only(i):
        with torch.no_grad():
            forward(batches[i % NUM_BATCHES])

    return dict(step_ms=cuda_median_ms(step, steps, warmup), forward_ms=cuda_median_ms(forward_only, steps, warmup))


def to_cuda(batch: dict) -> dict:
    moved = {k: v.cuda() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    moved["per_table"] = [(ids.cuda(), offsets.cuda()) for ids, offsets in batch["per_table"]]
    return moved


def run_cuda(args) -> None:
    settings = dict(CUDA_PRESET)
    for key in ("tables", "rows", "dims", "batch_sizes", "distributions"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    dtypes = args.dtypes or ["fp32", "fp16"]
    copy_gbps = copy_bandwidth_gbps()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    rows = []
    for dim in settings["dims"]:
        for batch_size in settings["batch_sizes"]:
            for dist in settings["distributions"]:
                config = Config(settings["tables"], settings["rows"], dim, batch_size, dist, args.pooling_factor, args.zipf_alpha)
                batches = [to_cuda(b) for b in make_batches(config)]
                n = sum(len(b["indices"]) for b in batches) / NUM_BATCHES
                for dtype in dtypes:
                    row = dict(label=f"{config.label()} {dtype}", dtype=dtype, config=asdict(config), indices_per_step=n, variants={})
                    elem = 2 if dtype == "fp16" else 4
                    # Forward traffic: each looked-up row read once, the output written once.
                    row["forward_bytes"] = n * dim * elem + batch_size * config.tables * dim * 4
                    for variant, build in (("dist_rec", build_dist_rec), ("torch", build_torch)):
                        result = time_cuda_variant(build, config, dtype, batches, args.steps, args.warmup)
                        row["variants"][variant] = result
                        torch.cuda.empty_cache()  # the model built for this variant is gone
                        print(
                            f"{row['label']:<40} {variant:<9} step {result['step_ms']:8.2f} ms  forward {result['forward_ms']:7.2f} ms",
                            flush=True,
                        )
                    rows.append(row)
    table = format_cuda_table(rows, copy_gbps)
    print()
    print(table)
    command = command_line(__file__)
    if args.markdown:
        text = f"""## Embedding training step (GPU)

Device: {torch.cuda.get_device_name()} (torch {torch.__version__}); measured device-to-device copy
{copy_gbps:.0f} GB/s (bytes read + written).

Command: `{command}` (CUDA-event medians; ids Poisson({args.pooling_factor:g}) per bag, Zipf exponent {args.zipf_alpha}).

A step is forward + backward + row-wise AdaGrad. "torch" is one
`nn.EmbeddingBag` per table with sparse gradients plus a hand-written row-wise
AdaGrad. Forward GB/s counts the looked-up rows read and the output written.

{table}
"""
        update_section(args.markdown, "gpu", text)
    if args.json:
        write_json(args.json, dict(device=torch.cuda.get_device_name(), copy_gbps=copy_gbps, command=command, rows=rows), indent=2)


def format_cuda_table(rows: List[dict], copy_gbps: float) -> str:
    header = [
        "config", "dist_rec step ms", "torch step ms", "step speedup", "dist_rec fwd ms", "torch fwd ms",
        "dist_rec fwd GB/s (of copy)", "torch fwd GB/s (of copy)",
    ]  # fmt: skip
    lines = []
    for r in rows:
        ours, theirs = r["variants"]["dist_rec"], r["variants"]["torch"]
        ours_gbps = r["forward_bytes"] / (ours["forward_ms"] * 1e-3) / 1e9
        theirs_gbps = r["forward_bytes"] / (theirs["forward_ms"] * 1e-3) / 1e9
        lines.append([
            r["label"], f"{ours['step_ms']:.2f}", f"{theirs['step_ms']:.2f}",
            f"{theirs['step_ms'] / ours['step_ms']:.2f}x", f"{ours['forward_ms']:.3f}", f"{theirs['forward_ms']:.3f}",
            f"{ours_gbps:.0f} ({ours_gbps / copy_gbps:.0%})", f"{theirs_gbps:.0f} ({theirs_gbps / copy_gbps:.0%})",
        ])  # fmt: skip
    return markdown_table(header, lines)


if __name__ == "__main__":
    main()
