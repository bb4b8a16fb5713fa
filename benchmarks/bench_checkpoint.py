"""What a save costs the training loop, and what incremental saves write.

Two measurements, alternated in rounds:

* ``stall``: a model with ``--gib`` GiB of embedding tables (row-wise AdaGrad,
  one process, table-wise), saved by the trainer's ``Checkpointer`` either
  synchronously (the step waits for the files: written, fsynced, hashed,
  published) or in the background (the step waits only for the snapshot into
  host buffers). The stall is the time the training thread was held.
* ``bytes``: the README main job's model and access pattern (one process,
  batch 2048, table-wise), and the same model on Criteo Kaggle's table
  sizes, saved with ``checkpoint.policy=incremental`` every ``--intervals``
  steps: the bytes of a delta (the rows changed since they were last saved,
  with their ids and row-wise state; weights exact or quantised to
  ``--delta-bits``) against a full save's.

    python benchmarks/bench_checkpoint.py --markdown docs/benchmarks.md
    python benchmarks/bench_checkpoint.py --part stall --gib 1 --rounds 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from harness import REPO, busy_note, command_line, machine_summary, markdown_table, update_section, warn_if_busy

sys.path.insert(0, str(REPO))

DIM = 64
TABLES = 8
# The access patterns of the bytes part: the README main job, and its model on Criteo Kaggle's table sizes
# (capped at 1M rows, 9.6M rows in all; Zipf 1.05), where a delta holds a small share of the rows.
KAGGLE_ROWS_CAPPED = [1460, 583, 1000000, 1000000, 305, 24, 12517, 633, 3, 93145, 5683, 1000000, 3194, 27, 14992,
                      1000000, 10, 5652, 2173, 4, 1000000, 18, 15, 286181, 105, 142572]  # fmt: skip
BYTES_JOBS = {
    "main": [],
    "kaggle-sized": [f"data.num_embeddings_per_feature={KAGGLE_ROWS_CAPPED}".replace(" ", ""), "data.zipf_exponent=1.05"],
}
BATCH = 512
BAG = 4


class _Position:
    def position(self, step):
        return {"step": step}

    def seek(self, extra, directory):
        return extra["step"]


def _big_model(gib: float):
    import torch

    from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig
    from dist_rec.distributed import init_single_process_group
    from dist_rec.models import DLRM
    from dist_rec.optim import RowWiseAdagrad
    from dist_rec.sharding import DistributedModelParallel, ShardingPlan, table_sharding

    rows = int(gib * 2**30 / (TABLES * DIM * 4))
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f"f{i}"]) for i in range(TABLES)]
    init_single_process_group()
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables, optimizer=RowWiseAdagrad(lr=0.05))
    model = DLRM(ebc, dense_in_features=13, dense_arch_layer_sizes=[64, DIM], over_arch_layer_sizes=[64, 1])
    plan = ShardingPlan(1)
    for t in tables:
        plan.tables[t.name] = table_sharding(t.name, rows, DIM, "table_wise", [0])
    dmp = DistributedModelParallel(model, plan=plan)
    optimizer = torch.optim.Adagrad([p for p in dmp.parameters() if p.requires_grad], lr=0.02)
    return dmp, optimizer, rows


def _step(dmp, optimizer, rows: int, step: int) -> None:
    import torch
    import torch.nn.functional as F

    from dist_rec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(step)
    keys = [f"f{i}" for i in range(TABLES)]
    values = torch.randint(0, rows, (TABLES * BATCH * BAG,), generator=g)
    kjt = KeyedJaggedTensor(keys, values, lengths=torch.full((TABLES * BATCH,), BAG))
    logits = dmp(torch.randn(BATCH, 13, generator=g), kjt).squeeze(1)
    loss = F.binary_cross_entropy_with_logits(logits, torch.randint(0, 2, (BATCH,), generator=g).float())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def stall(args, workdir: Path) -> Dict:
    from dist_rec.config import CheckpointConfig
    from dist_rec.trainer.checkpointing import Checkpointer

    dmp, optimizer, rows = _big_model(args.gib)
    made = {}
    for mode in ("sync", "async"):
        made[mode] = Checkpointer(workdir / mode, 0, 10**9, dmp, optimizer, _Position(), lambda *a: None,
                                  config=CheckpointConfig(async_save=mode == "async", keep_last=1),
                                  group=dmp.process_groups.subgroup(f"ck-{mode}"), lock=True)  # fmt: skip
    step = 0
    results: Dict[str, List[Dict]] = {"sync": [], "async": []}
    for round_index in range(args.rounds):
        for mode in (("sync", "async") if round_index % 2 == 0 else ("async", "sync")):
            for _ in range(3):
                step += 1
                _step(dmp, optimizer, rows, step)
            checkpointer = made[mode]
            checkpointer.save(step)
            record = checkpointer.saves[-1]
            tick = time.perf_counter()
            while checkpointer.writer.busy:  # training goes on while the background write runs
                step += 1
                _step(dmp, optimizer, rows, step)
            checkpointer.finish()
            record["steps_during_write"] = step - record["step"]
            record["overlap_s"] = time.perf_counter() - tick
            results[mode].append(record)
            print(f"[stall] round {round_index + 1} {mode}: stalled {record['stall_s']:.2f} s, written in "
                  f"{record.get('write_s', 0):.2f} s, {record['bytes'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    for checkpointer in made.values():
        checkpointer.close()
    from dist_rec.distributed import destroy_process_group

    destroy_process_group()
    sync = statistics.median(r["stall_s"] for r in results["sync"])
    background = statistics.median(r["stall_s"] for r in results["async"])
    return {"gib": args.gib, "rows": rows, "results": results, "sync_s": sync, "async_stall_s": background,
            "async_write_s": statistics.median(r["write_s"] for r in results["async"]),
            "async_first_s": results["async"][0]["stall_s"],
            "ratio": background / sync, "bytes": results["sync"][0]["bytes"]}  # fmt: skip


def incremental_bytes(args, workdir: Path) -> Dict:
    import torch

    from dist_rec.checkpoint.files import component
    from dist_rec.config import load_config
    from dist_rec.distributed import destroy_process_group
    from dist_rec.trainer import Environment, Trainer

    out = {}
    for job, interval, bits in [(j, i, b) for j in args.bytes_jobs for i in args.intervals for b in args.delta_bits]:
        root = workdir / f"inc-{job}-{interval}-{bits}"
        config = load_config(str(REPO / "launch/configs/default.yaml"), [
            *BYTES_JOBS[job], "train.batch_size=2048", "sharding.type=table_wise", f"train.steps={interval * (args.deltas + 1)}",
            "train.eval_every=0", f"train.output_dir={workdir / 'out'}", f"train.checkpoint_dir={root}",
            "checkpoint.policy=incremental", f"checkpoint.base_every={args.deltas + 1}", "checkpoint.keep_last=1",
            f"checkpoint.delta_bits={bits}",
        ])  # fmt: skip
        trainer = Trainer(config, Environment(), quiet=True)
        batches = trainer._stream(0)
        for step in range(1, config.train.steps + 1):
            trainer.pipeline.progress(batches)
            if step % interval == 0:
                trainer.checkpointer.save(step)
        trainer.checkpointer.finish()
        trainer.checkpointer.close()
        # What a load of the last delta would rebuild (the saver's reference) against the live rows.
        error, scale = 0.0, []
        for path, sharded in trainer.checkpointer.model.sharded.items():
            for local in sharded.local_shards():
                weight = local.read()[0]
                scale.append(weight.float().pow(2).mean().sqrt().item())
                name = f"{component(path)}/{component(local.table)}/r{local.shard.row_offset}_c{local.shard.col_offset}.pt"
                reference = trainer.checkpointer.buffers.references.get(name)
                if reference is not None:
                    error = max(error, (reference.float() - weight.float()).abs().max().item())
        destroy_process_group()
        saves = trainer.checkpointer.saves
        full = saves[0]["bytes"]
        deltas = [s["bytes"] for s in saves if s["kind"] == "delta"]
        rows = [s["rows_saved"] / s["rows_total"] for s in saves if s["kind"] == "delta"]
        out[(job, interval, bits)] = {"full": full, "deltas": deltas, "ratio": statistics.mean(deltas) / full,
                                      "rows": statistics.mean(rows), "max_error": error,
                                      "weight_rms": statistics.median(scale)}  # fmt: skip
        r = out[(job, interval, bits)]
        print(f"[bytes] {job}, every {interval} steps, {bits}-bit deltas: a delta writes {r['ratio']:.1%} of a full "
              f"save's bytes ({r['rows']:.1%} of the rows); rebuilt rows off by at most {error:.2e} "
              f"(weights' RMS {r['weight_rms']:.2e})", flush=True)  # fmt: skip
    return out


def _markdown(stall_result, bytes_result, args, argv, load) -> str:
    lines = ["## Checkpoint stall and incremental bytes (bench_checkpoint.py)", "",
             f"`{command_line(__file__, argv)}`", "", f"{machine_summary()}.{busy_note(load)}", ""]  # fmt: skip
    if stall_result:
        s = stall_result
        lines += [
            f"**Stall** at {s['gib']:g} GiB of tables ({TABLES} x {s['rows']:,} rows x {DIM}, row-wise AdaGrad, one "
            f"process), medians of {args.rounds} rounds (sync and background alternated):",
            "",
            markdown_table(["save", "training thread held (s)", "written in (s)", "GiB"], [
                ["synchronous (write, fsync, hash, publish in the step)", f"{s['sync_s']:.2f}", f"{s['sync_s']:.2f}",
                 f"{s['bytes'] / 2**30:.2f}"],
                ["background (snapshot to host buffers; writer thread)", f"{s['async_stall_s']:.2f}",
                 f"{s['async_write_s']:.2f}", f"{s['bytes'] / 2**30:.2f}"],
            ]),  # fmt: skip
            "",
            f"Background stall / synchronous save: **{s['ratio']:.1%}** (goal: at most 10%). The first background "
            f"save of a run also maps its host buffers: {s['async_first_s']:.2f} s, once.",
            "",
        ]
    if bytes_result:
        rows = [[k[0], k[1], "exact" if k[2] == 32 else f"{k[2]}-bit", f"{v['full'] / 2**20:.1f}",
                 f"{statistics.mean(v['deltas']) / 2**20:.2f}", f"{v['rows']:.1%}", f"{v['ratio']:.1%}",
                 "0" if k[2] == 32 else f"{v['max_error']:.1e} ({v['max_error'] / v['weight_rms']:.1%})"]
                for k, v in bytes_result.items()]  # fmt: skip
        lines += [
            "**Incremental bytes** on the main job's access pattern (launch/configs/default.yaml: 26 tables, 0.19M "
            "rows x 16, Zipf 1.1; one process, batch 2048) and on the same model with Criteo Kaggle's table sizes "
            f"(capped at 1M rows: 9.6M rows, Zipf 1.05), {args.deltas} deltas per interval after a base. A delta names "
            "its rows by id or by bitmap, whichever is smaller; its weights are exact, or (`checkpoint.delta_bits`) "
            "each row's change since the previous save quantised to 8 or 4 bits (Check-N-Run). Rebuilt error: the "
            "largest difference between what a load of the last delta rebuilds and the live weights (and against the "
            "weights' RMS):",
            "",
            markdown_table(["access pattern", "interval (steps)", "delta weights", "full save MiB", "delta MiB (mean)",
                            "rows in a delta", "delta / full", "rebuilt error"], rows),  # fmt: skip
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=["stall", "bytes"], default=["stall", "bytes"])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--intervals", type=int, nargs="+", default=[16, 60, 200])
    parser.add_argument("--deltas", type=int, default=3)
    parser.add_argument("--delta-bits", type=int, nargs="+", choices=[32, 8, 4], default=[32, 8, 4])
    parser.add_argument("--bytes-jobs", nargs="+", choices=sorted(BYTES_JOBS), default=["main", "kaggle-sized"])
    parser.add_argument("--dir", type=Path, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    load = warn_if_busy()
    workdir = Path(tempfile.mkdtemp(prefix="bench_checkpoint-", dir=args.dir))
    try:
        stall_result = stall(args, workdir) if "stall" in args.part else None
        bytes_result = incremental_bytes(args, workdir) if "bytes" in args.part else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = _markdown(stall_result, bytes_result, args, argv if argv is not None else sys.argv[1:], load)
    print(text)
    if args.markdown:
        update_section(args.markdown, "bench_checkpoint", text)


if __name__ == "__main__":
    main()
