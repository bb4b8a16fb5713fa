"""The data readers, and what background prefetch buys the trainer.

Readers: samples/s of each reader on files of each shape (Criteo TSV with
the Criteo reader and with the generic schema reader, Avazu-like CSV,
MovieLens-like multi-hot, a weighted sequence column, the Avazu file as
Parquet, and its binary conversion read in order and shuffled; the synthetic
workload for reference), one process, batches of ``--batch``:

* ``alone``: the reader's own rate, nothing else running;
* ``inline`` / ``thread`` / ``process``: the reader feeding a consumer
  that computes for about as long as the reader takes per batch (torch
  matmuls on one thread), read by the consumer's thread itself, by a
  ``Prefetcher`` thread, or by a ``BatchWorker`` process, two batches
  ahead. With a core free for the worker, perfect overlap halves the
  inline time.

Trainer: the README's main job (``launch/configs/default.yaml``, 2
processes, synthetic data) for ``--steps`` steps, with its batches
``pregenerated`` (all made before the run: the step time without any data
cost), generated ``inline`` by the training thread (``data.prefetch=0``),
by a worker ``thread``, or by the worker ``process`` (what
``data.prefetch_worker: auto`` picks for synthetic and text data), and
``cycled``: the worker process handing over 16 batches made before the run,
round and round (the hand-over's cost without the generator's). Each
process is pinned to its own core as ``train.pin_cores`` pins a torchrun
process (``--unpinned``: not). The step time is the median over the
progress intervals after the first; variants alternate over ``--rounds``.

    python benchmarks/bench_data.py --markdown docs/benchmarks.md --json runs/bench_data.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from harness import (
    REPO,
    busy_note,
    command_line,
    machine_summary,
    markdown_table,
    median_fields,
    per_round_ratios,
    ratio_cell,
    run_ranks,
    run_rounds,
    run_worker_process,
    update_section,
    warn_if_busy,
    write_json,
    write_worker_result,
)

READERS = ["criteo", "criteo_schema", "avazu", "movielens", "sequence", "parquet", "binary", "binary_shuffled", "synthetic"]
TRAINER_VARIANTS = ["pregenerated", "inline", "thread", "process", "cycled"]


# -- readers -------------------------------------------------------------------------------


def make_files(root: Path, lines: int) -> Dict[str, Path]:
    """The input files of every reader, written once per run."""
    from dist_rec.data.convert import convert
    from dist_rec.data.schema import Schema
    from dist_rec.testing import tables

    files = {
        "criteo": tables.write_lines(root / "day.tsv", tables.criteo_lines(lines, seed=1)),
        "avazu": tables.write_lines(root / "avazu.csv", tables.avazu_lines(lines, seed=1)),
        "movielens": tables.write_lines(root / "ratings.csv", tables.movielens_lines(lines, seed=1)),
        "sequence": tables.write_lines(root / "behaviour.tsv", tables.sequence_lines(lines, seed=1)),
    }
    files["parquet"] = tables.write_parquet(files["avazu"], root / "avazu.parquet", tables.AVAZU_SCHEMA)
    convert([files["avazu"]], Schema.from_dict(tables.AVAZU_SCHEMA), root / "avazu_bin")
    files["binary"] = root / "avazu_bin"
    return files


def open_reader(kind: str, files: Dict[str, str]):
    from dist_rec.data.binary import BinaryDataset
    from dist_rec.data.convert import open_table
    from dist_rec.data.criteo import CriteoTextDataset
    from dist_rec.data.schema import Schema, criteo_schema
    from dist_rec.data.synthetic import SyntheticConfig, SyntheticDataset
    from dist_rec.testing import tables

    schemas = {"avazu": tables.AVAZU_SCHEMA, "movielens": tables.MOVIELENS_SCHEMA, "sequence": tables.SEQUENCE_SCHEMA,
               "parquet": tables.AVAZU_SCHEMA}  # fmt: skip
    if kind == "criteo":
        return CriteoTextDataset([files["criteo"]], 100_000)
    if kind == "criteo_schema":
        return open_table([files["criteo"]], criteo_schema(100_000))
    if kind in schemas:
        return open_table([files[kind]], Schema.from_dict(schemas[kind]))
    if kind == "binary":
        return BinaryDataset(files["binary"])
    if kind == "binary_shuffled":
        return BinaryDataset(files["binary"], shuffle_seed=0)
    config = yaml_config()["data"]
    return SyntheticDataset(SyntheticConfig(num_embeddings_per_feature=config["num_embeddings_per_feature"],
                                            num_dense_features=13), "train")  # fmt: skip


def yaml_config() -> dict:
    import yaml

    return yaml.safe_load((REPO / "launch" / "configs" / "default.yaml").read_text())


def reader_worker(kind: str, files: Dict[str, str], batch: int, batches: int) -> dict:
    """One reader in this process: alone, then feeding a consumer inline and prefetched."""
    import torch

    from dist_rec.data.prefetch import BatchWorker, Prefetcher

    torch.set_num_threads(1)

    def stream():
        return open_reader(kind, files).batches(batch, drop_last=True)

    def timed(iterator, consume) -> float:
        start = time.perf_counter()
        count = 0
        for b in iterator:
            consume(b)
            count += 1
            if count == batches:
                break
        if count < batches:
            raise SystemExit(f"{kind}: only {count} batches of {batch} in the files; lower --batches")
        return time.perf_counter() - start

    alone = timed(stream(), lambda b: None)
    per_batch = alone / batches
    a = torch.randn(128, 128)
    reps = 1
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    matmul = (time.perf_counter() - start) / 20
    reps = max(1, round(per_batch / matmul))

    def compute(_):
        for _ in range(reps):
            a @ a

    compute_alone = timed(iter([None] * batches), compute)
    inline = timed(stream(), compute)
    prefetcher = Prefetcher(stream(), depth=2)
    thread = timed(prefetcher, compute)
    prefetcher.close()
    worker = BatchWorker(open_reader(kind, files), depth=2)  # forked before the consumer's tensors exist, as in the trainer
    process = timed(worker.start(1, batch, 0, 1), compute)
    worker.close()
    return {"reader": kind, "samples_per_s": batch * batches / alone, "compute_s": compute_alone, "alone_s": alone,
            "inline_s": inline, "thread_s": thread, "process_s": process}  # fmt: skip


# -- trainer -------------------------------------------------------------------------------


class Pregenerated:
    """A dataset's batches for this rank, all made before training starts."""

    equal_batches_per_rank = True

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, steps: int) -> None:
        self.sparse_feature_names = dataset.sparse_feature_names
        self.num_dense_features = dataset.num_dense_features
        stream = dataset.batches(batch_size, rank, world_size)
        self._batches = [next(stream) for _ in range(steps)]

    def batches(self, batch_size, rank=0, world_size=1, drop_last=True, start_step=0):
        return iter(self._batches[start_step:])


class Cycled(Pregenerated):
    """16 batches made before the worker starts, served round and round."""

    def __init__(self, dataset, batch_size, rank, world_size):
        super().__init__(dataset, batch_size, rank, world_size, 16)

    def batches(self, batch_size, rank=0, world_size=1, drop_last=True, start_step=0):
        import itertools

        return itertools.islice(itertools.cycle(self._batches), start_step, None)


def trainer_rank(rank: int, world_size: int, variant: str, steps: int, log_every: int, out: str) -> Optional[dict]:
    from dist_rec.config import TrainConfig
    from dist_rec.train import Environment, Trainer

    values = yaml_config()
    values["train"].update(steps=steps, eval_every=0, log_every=log_every, output_dir=out)
    values["data"]["eval_samples"] = 2048
    values["data"]["prefetch"] = 0 if variant in ("inline", "pregenerated") else 2
    values["data"]["prefetch_worker"] = "thread" if variant == "thread" else "process"
    config = TrainConfig.from_dict(values)
    env = Environment(rank=rank, world_size=world_size, local_world_size=world_size, backend="gloo")
    if variant == "cycled":
        import dist_rec.trainer.trainer as trainer_module

        build = trainer_module.build_data

        def cycled_data(config):
            data = build(config)
            data.train = Cycled(data.train, config.train.batch_size, rank, world_size)
            return data

        trainer_module.build_data = cycled_data
    trainer = Trainer(config, env, quiet=True)
    if variant == "pregenerated":
        trainer.data.train = Pregenerated(trainer.data.train, config.train.batch_size, rank, world_size, steps)
    import resource

    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    trainer.train()
    cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
    busy = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / wall
    if rank != 0:
        return None
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["examples_per_second"] for r in records if r.get("kind") == "train"][1:]  # after the first interval
    global_batch = config.train.batch_size * world_size
    return {"variant": variant, "examples_per_s": statistics.median(rates),
            "step_ms": 1000 * global_batch / statistics.median(rates), "intervals": len(rates),
            "cpu_busy": busy, "minor_faults_per_step": (cpu1.ru_minflt - cpu0.ru_minflt) / steps,
            "switches_per_step": (cpu1.ru_nvcsw + cpu1.ru_nivcsw - cpu0.ru_nvcsw - cpu0.ru_nivcsw) / steps}  # fmt: skip


# -- report ----------------------------------------------------------------------------------


def report(readers: Dict[str, List[dict]], trainer: Dict[str, List[dict]], args, load, argv) -> str:
    lines = ["## Data readers and prefetch", "", machine_summary() + busy_note(load), "",
             f"`{command_line(__file__, argv)}`", ""]  # fmt: skip
    if readers:
        rows = []
        for kind, results in readers.items():
            m = median_fields(results)
            per_batch = [f"{1000 * m[k] / args.batches:.1f}" for k in ("alone_s", "compute_s", "inline_s", "thread_s", "process_s")]
            rows.append([kind, f"{m['samples_per_s']:,.0f}", *per_batch,
                         ratio_cell([r["thread_s"] / r["inline_s"] for r in results], count_rounds=False),
                         ratio_cell([r["process_s"] / r["inline_s"] for r in results], count_rounds=False)])  # fmt: skip
        lines += [f"Readers, one process, batches of {args.batch:,} ({args.lines:,}-line files; medians of "
                  f"{len(next(iter(readers.values())))} rounds). Then the reader feeds a consumer that computes (one torch thread) about "
                  "as long per batch as the reader reads it, reading inline, from a thread or from the worker "
                  "process: with a core free for the worker the ideal is 0.50x of inline.", "",
                  markdown_table(["reader", "samples/s alone", "ms/batch: read", "compute", "read + compute inline",
                                  "thread", "process", "thread / inline", "process / inline"], rows), ""]  # fmt: skip
    if trainer:
        base = trainer["pregenerated"]
        rows = []
        for variant, results in trainer.items():
            m = median_fields(results)
            rows.append([variant, f"{m['examples_per_s']:,.0f}", f"{m['step_ms']:.1f}",
                         ratio_cell(per_round_ratios(results, base, "step_ms"))])  # fmt: skip
        rounds = len(trainer["pregenerated"])
        pinned = {r.get("pinned") for results in trainer.values() for r in results}
        how = {frozenset({True}): ", each pinned to its cores", frozenset({False}): ", not pinned"}.get(frozenset(pinned), "")
        lines += [f"Trainer, the README's main job (2 processes{how}, {args.steps} steps, synthetic data), step time "
                  f"against pregenerated batches ({rounds} rounds, variants alternated):", "",
                  markdown_table(["batches", "examples/s", "step ms", "step time / pregenerated"], rows), ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", nargs="*", choices=READERS, default=READERS)
    parser.add_argument("--trainer", nargs="*", choices=TRAINER_VARIANTS, default=TRAINER_VARIANTS)
    parser.add_argument("--lines", type=int, default=120_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=25)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unpinned", action="store_true", help="trainer processes not pinned to cores (train.pin_cores=false)")
    parser.add_argument("--from-json", type=Path, nargs="+", help="render the tables from earlier runs' JSON (rounds pooled)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        write_worker_result(args.result, reader_worker(args.worker, json.loads(args.files), args.batch, args.batches))
        return
    readers: Dict[str, List[dict]] = {}
    trainer: Dict[str, List[dict]] = {}
    if args.from_json:
        for path in args.from_json:
            run = json.loads(path.read_text())
            for pooled, part in ((readers, run["readers"]), (trainer, run["trainer"])):
                for variant, results in part.items():
                    pooled.setdefault(variant, []).extend(results)
        args.rounds = max((len(r) for r in [*readers.values(), *trainer.values()]), default=0)
        publish(report(readers, trainer, args, [0.0], argv), readers, trainer, args)
        return
    load = warn_if_busy()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as root:
        if args.readers:
            files = {k: str(v) for k, v in make_files(Path(root), args.lines).items()}

            def measure_reader(kind, round_index):
                result = run_worker_process(__file__, ["--worker", kind, "--files", json.dumps(files), "--batch",
                                                       str(args.batch), "--batches", str(args.batches)], label=kind)  # fmt: skip
                print(json.dumps(result), flush=True)
                return result

            readers = run_rounds(args.readers, args.rounds, measure_reader)
        if args.trainer:

            def measure_trainer(variant, round_index):
                out = str(Path(root) / f"{variant}{round_index}")
                (result,) = [r for r in run_ranks(trainer_rank, 2, 1800, label=variant, variant=variant, steps=args.steps,
                                                  log_every=args.log_every, out=out, pin=not args.unpinned) if r]  # fmt: skip
                result["pinned"] = not args.unpinned
                print(json.dumps(result), flush=True)
                return result

            trainer = run_rounds(args.trainer, args.rounds, measure_trainer)
    publish(report(readers, trainer, args, load, argv), readers, trainer, args)


def publish(text: str, readers, trainer, args) -> None:
    print(text)
    if args.json:
        write_json(args.json, {"readers": readers, "trainer": trainer}, indent=1)
    if args.markdown:
        update_section(args.markdown, "data", text)


if __name__ == "__main__":
    sys.exit(main())
