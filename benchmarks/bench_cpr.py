"""CPR's study on this machine: full recovery against partial recovery with
full, MFU and SSU saves, under the same injected failures.

Seed paper: "CPR: Understanding and Improving Failure Tolerant Training for
Deep Learning Recommendation with Partial Recovery" (Maeng et al.). As the
paper does, failures are emulated inside one training process, so that every
policy meets the same failures at the same steps and the figures are not
buried under process start-up on a 2-core machine:

* the model is the job's DLRM (one process, its tables cut into ``--shards``
  emulated embedding shards, table-wise, balanced by rows);
* failures arrive at exponentially distributed steps (mean ``--mtbf`` of the
  run's steps, seeded: the same for every policy); each one takes a random
  shard;
* **full recovery** (what TorchRec does): every rank goes back to the last
  checkpoint (a real ``load_checkpoint`` of the series) and the steps since
  it are trained again (real time: the lost work), at Young/Daly's interval
  from the measured save cost;
* **CPR partial recovery**: only the failed shard's tables come back from
  the checkpoint (a real ``restore_local_shards`` of the chain), training
  goes on, the shard's updates since its save are lost (PLS); the interval is
  the largest whose expected PLS stays under ``--target-pls``; saves are
  full (``partial``), CPR-MFU (``mfu``), CPR-SSU (``ssu``) or every touched
  row with its change quantised to 4 bits (``inc4``, Check-N-Run).

Saves are the trainer's own (``dist_rec.trainer.checkpointing``: snapshot
on the training thread, background writer). The overhead of a policy is the
time its saves stalled training, plus the lost work, plus the restores, as a
share of the fault-free run's training time (a restarted job's process
start-up, about 16 s per failure on this machine, is not counted: it would
only add to full recovery). Quality is the final AUC / NE on the job's
evaluation set against the fault-free run.

    python benchmarks/bench_cpr.py --markdown docs/benchmarks.md
    python benchmarks/bench_cpr.py --jobs main --steps 600        # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from harness import (
    REPO, busy_note, command_line, machine_summary, markdown_table, update_section, warn_if_busy, write_json,
)  # fmt: skip

sys.path.insert(0, str(REPO))

JOBS = {
    # The README main job's model and data (launch/configs/default.yaml).
    "main": dict(config="launch/configs/default.yaml", overrides=["train.batch_size=1024"], steps=1500),
    # The same, multi-hot (8 ids per bag) and 32 wide: lookups and saves weigh more.
    "multihot": dict(
        config="launch/configs/default.yaml",
        overrides=["train.batch_size=512", "data.mean_bag_length=8.0", "model.embedding_dim=32",
                   "model.dense_arch_layer_sizes=[64,32]"],  # fmt: skip
        steps=800,
    ),
}
POLICIES = ["full", "partial", "mfu", "ssu", "inc4"]  # full = full recovery; the others recover partially
LABELS = {"full": "full recovery (full saves)", "partial": "CPR partial recovery (full saves)",
          "mfu": "CPR-MFU", "ssu": "CPR-SSU", "inc4": "CPR partial recovery (incremental, 4-bit deltas)"}  # fmt: skip
# The checkpoint settings of each policy (beyond the shared ones).
SETTINGS = {"full": ["checkpoint.policy=full"], "partial": ["checkpoint.policy=full"], "mfu": ["checkpoint.policy=mfu"],
            "ssu": ["checkpoint.policy=ssu"], "inc4": ["checkpoint.policy=incremental", "checkpoint.delta_bits=4"]}  # fmt: skip


def _config(job: dict, steps: int, checkpoint_dir: str, output_dir: str, extra: List[str]):
    from dist_rec.config import load_config

    return load_config(str(REPO / job["config"]), [
        *job["overrides"], "sharding.type=table_wise", f"train.steps={steps}", "train.eval_every=0", "train.log_every=1000000",
        f"train.output_dir={output_dir}", f"train.checkpoint_dir={checkpoint_dir}", *extra,
    ])  # fmt: skip


def _shards(trainer, count: int) -> List[List[str]]:
    """Tables cut into ``count`` emulated shards, table-wise, balanced by rows."""
    tables = sorted(trainer.sharded.plans["sparse_arch"].tables.values(), key=lambda t: -t.num_embeddings)
    shards: List[List[str]] = [[] for _ in range(count)]
    load = [0] * count
    for t in tables:
        k = load.index(min(load))
        shards[k].append(t.table)
        load[k] += t.num_embeddings
    return shards


def _failures(steps: int, mtbf_steps: float, shards: int, seed: int) -> List[tuple]:
    rng = random.Random(seed)
    out, at = [], 0.0
    while True:
        at += rng.expovariate(1.0 / mtbf_steps)
        if at >= steps - 1:
            return out
        out.append((max(1, int(at)), rng.randrange(shards)))


def _run(job: dict, steps: int, policy: str, interval: int, failures, args, workdir: Path) -> Dict:
    """One training run of ``policy`` ("none": fault-free, no saves)."""
    from dist_rec.checkpoint import restore_local_shards
    from dist_rec.trainer import Environment, Trainer

    root = workdir / f"ckpt-{policy}"
    shutil.rmtree(root, ignore_errors=True)
    extra = [] if policy == "none" else [*SETTINGS[policy], f"checkpoint.mfu_fraction={args.fraction}", f"checkpoint.ssu_fraction={args.fraction}",
                                         f"checkpoint.base_every={args.base_every}", "checkpoint.keep_last=2"]  # fmt: skip
    config = _config(job, steps, str(root), str(workdir / f"out-{policy}"), extra)  # (the same sharded model, unsaved)
    trainer = Trainer(config, Environment(), quiet=True)
    shards = _shards(trainer, args.shards)
    checkpointer = trainer.checkpointer
    batches = trainer._stream(0)
    pending = list(failures) if policy != "none" else []
    step, redo_until = 0, 0
    train_s = lost_s = recover_s = 0.0
    lost_samples, restored_bytes = 0, 0
    saved_at = 0
    if policy != "none":
        checkpointer.save(0)  # the initial state: a failure before the first interval goes back to it
    while step < steps:
        tick = time.perf_counter()
        trainer.pipeline.progress(batches)
        step += 1
        took = time.perf_counter() - tick
        if step <= redo_until:
            lost_s += took  # a step trained again after a full recovery
        else:
            train_s += took
        if policy != "none" and step % interval == 0 and step > saved_at:
            checkpointer.save(step)
            saved_at = step
        checkpointer.poll()
        if pending and step == pending[0][0] and step > redo_until:
            _, shard = pending.pop(0)
            checkpointer.finish()  # (the save in flight is let finish: a slight favour to every policy alike)
            tick = time.perf_counter()
            if policy == "full":
                trainer.pipeline.reset()
                resumed = checkpointer.resume()  # every table, the dense layers and the data stream
                batches = trainer._stream(resumed)
                redo_until, step = step, resumed
            else:
                restore_local_shards(root, trainer.sharded, tables=shards[shard])
                last = int(checkpointer.latest().name.split("-")[1]) if checkpointer.latest() else 0
                lost_samples += (step - last) * config.train.batch_size  # the shard's updates since its save
            recover_s += time.perf_counter() - tick
    checkpointer.finish()
    stall_s = sum(s["stall_s"] for s in checkpointer.saves)
    metrics = trainer.evaluator.evaluate(step, final=True)
    checkpointer.close()
    from dist_rec.distributed import destroy_process_group

    if trainer._own_group:
        destroy_process_group()
    saves = checkpointer.saves
    return {
        "policy": policy, "interval": interval, "steps": steps, "failures": len(failures) if policy != "none" else 0,
        "train_s": train_s, "stall_s": stall_s, "lost_s": lost_s, "recover_s": recover_s,
        "saves": len(saves), "bytes": sum(s["bytes"] for s in saves),
        "full_bytes": max((s["bytes"] for s in saves if s["kind"] == "base"), default=0),
        "delta_bytes": [s["bytes"] for s in saves if s["kind"] == "delta"],
        "pls": lost_samples / (args.shards * steps * config.train.batch_size),
        "auc": metrics.auc, "ne": metrics.ne,
    }


def _save_cost(job: dict, args, workdir: Path) -> tuple:
    """The stall and the write time of a background full save of this job (medians of 5)."""
    from dist_rec.trainer import Environment, Trainer

    root = workdir / "ckpt-calibration"
    shutil.rmtree(root, ignore_errors=True)
    trainer = Trainer(_config(job, 40, str(root), str(workdir / "out-calibration"), []), Environment(), quiet=True)
    batches = trainer._stream(0)
    for step in range(1, 41):
        trainer.pipeline.progress(batches)
        if step % 8 == 0:
            trainer.checkpointer.save(step)
    trainer.checkpointer.finish()
    stalls = sorted(s["stall_s"] - s["waited_s"] for s in trainer.checkpointer.saves)
    writes = sorted(s["write_s"] for s in trainer.checkpointer.saves)
    trainer.checkpointer.close()
    from dist_rec.distributed import destroy_process_group

    destroy_process_group()
    return stalls[len(stalls) // 2], writes[len(writes) // 2]


def study(name: str, args, workdir: Path) -> Dict:
    from dist_rec.checkpoint.interval import partial_recovery_interval, young_daly

    job = dict(JOBS[name])
    steps = args.steps or job["steps"]
    print(f"[{name}] fault-free run, {steps} steps ...", flush=True)
    clean = _run(job, steps, "none", 0, [], args, workdir)
    step_s = clean["train_s"] / steps
    cost, write = _save_cost(job, args, workdir)
    mtbf_steps = steps * args.mtbf
    mtbf_s = mtbf_steps * step_s
    failures = _failures(steps, mtbf_steps, args.shards, args.seed)
    # (never shorter than a background write: at most one save in flight)
    full_interval = max(1, round(max(young_daly(cost, mtbf_s), write) / step_s))
    partial_interval = max(1, round(max(partial_recovery_interval(args.target_pls, mtbf_s, args.shards), write) / step_s))
    print(f"[{name}] step {step_s * 1000:.1f} ms, save stall {cost * 1000:.1f} ms (written in {write:.2f} s), MTBF {mtbf_steps:.0f} steps "
          f"({mtbf_s:.1f} s), failures at {failures}; intervals: full recovery {full_interval} steps (Young/Daly), "
          f"partial {partial_interval} steps (PLS <= {args.target_pls})", flush=True)  # fmt: skip
    runs = []
    for policy in POLICIES:
        interval = full_interval if policy == "full" else partial_interval
        print(f"[{name}] {LABELS[policy]}: a save every {interval} steps ...", flush=True)
        result = _run(job, steps, policy, interval, failures, args, workdir)
        result["overhead"] = (result["stall_s"] + result["lost_s"] + result["recover_s"]) / clean["train_s"]
        print(f"[{name}]   overhead {result['overhead']:.2%} (stall {result['stall_s']:.1f} s, lost {result['lost_s']:.1f} s, "
              f"restore {result['recover_s']:.1f} s), {result['bytes'] / 2**20:.0f} MiB written, PLS {result['pls']:.4f}, "
              f"AUC {result['auc']:.4f} (fault-free {clean['auc']:.4f})", flush=True)  # fmt: skip
        runs.append(result)
    return {"job": name, "steps": steps, "step_s": step_s, "save_cost_s": cost, "write_s": write, "mtbf_steps": mtbf_steps,
            "failures": failures, "clean": clean, "runs": runs}  # fmt: skip


def _plot(studies: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 4.2), squeeze=False)
    for ax, s in zip(axes[0], studies):
        for r in s["runs"]:
            ax.scatter(100 * r["overhead"], r["auc"], s=60, label=LABELS[r["policy"]])
            ax.annotate(r["policy"], (100 * r["overhead"], r["auc"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.axhline(s["clean"]["auc"], color="grey", linestyle="--", linewidth=1, label="fault-free AUC")
        ax.set_xlabel("overhead (% of fault-free training time)")
        ax.set_ylabel("final AUC")
        ax.set_title(f"{s['job']}: {len(s['failures'])} failures in {s['steps']} steps")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _markdown(studies: List[Dict], args, argv, load) -> str:
    lines = [
        "## CPR: partial recovery and prioritised saves (bench_cpr.py)",
        "",
        f"`{command_line(__file__, argv)}`",
        "",
        f"{machine_summary()}.{busy_note(load)} One process, failures emulated as in the CPR paper: the same "
        f"{args.shards} emulated shards and the same failure steps (exponential, mean {args.mtbf:.0%} of the run) for "
        "every policy. Overhead = save stalls + lost work + restores, as a share of the fault-free training time "
        "(process restarts not counted). PLS = the share of samples whose updates to the failed shard were lost. "
        f"MFU / SSU save {args.fraction:.0%} of each shard's rows per delta, a full base every {args.base_every} saves. "
        "\"Steps' time\" is the training steps' own time against the fault-free run's: it carries what the overhead "
        "column leaves out, the background writer's competition for the 2 cores (and run-to-run noise, a few %).",
        "",
    ]
    for s in studies:
        clean = s["clean"]
        lines += [
            f"**{s['job']}**: {s['steps']} steps of {clean['train_s'] / s['steps'] * 1000:.1f} ms, a background full "
            f"save stalls {s['save_cost_s'] * 1000:.1f} ms and is written in {s['write_s']:.2f} s, failures at steps {[f for f, _ in s['failures']]}; "
            f"fault-free AUC {clean['auc']:.4f}, NE {clean['ne']:.4f}.",
            "",
        ]
        rows = []
        for r in s["runs"]:
            deltas = r["delta_bytes"]
            delta = f"{sum(deltas) / len(deltas) / max(r['full_bytes'], 1):.1%}" if deltas else "-"
            rows.append([
                LABELS[r["policy"]], r["interval"], r["saves"], f"{r['overhead']:.2%}",
                f"{r['train_s'] / clean['train_s'] - 1:+.1%}", f"{r['stall_s']:.2f}",
                f"{r['lost_s']:.2f}", f"{r['recover_s']:.2f}", f"{r['bytes'] / 2**20:.0f}", delta, f"{r['pls']:.4f}",
                f"{r['auc']:.4f} ({r['auc'] - clean['auc']:+.4f})", f"{r['ne']:.4f} ({r['ne'] - clean['ne']:+.4f})",
            ])  # fmt: skip
        lines += [markdown_table(["policy", "interval (steps)", "saves", "overhead", "steps' time vs fault-free",
                                  "stall s", "lost work s",
                                  "restore s", "MiB written", "delta / full", "PLS", "AUC (vs fault-free)",
                                  "NE (vs fault-free)"], rows), ""]  # fmt: skip
    lines.append(f"![AUC against overhead](cpr.png)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=["main", "multihot"])
    parser.add_argument("--steps", type=int, default=0, help="steps per run (0: the job's)")
    parser.add_argument("--mtbf", type=float, default=0.25, help="mean steps between failures, as a share of the run")
    parser.add_argument("--shards", type=int, default=4, help="emulated embedding shards (N_emb)")
    parser.add_argument("--target-pls", type=float, default=0.02)
    parser.add_argument("--fraction", type=float, default=0.1, help="MFU / SSU share of rows per delta")
    parser.add_argument("--base-every", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--markdown", type=Path, help="update this page's bench_cpr section")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "cpr.png")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path, help="render the table and plot of an earlier run's --json")
    args = parser.parse_args(argv)
    load = warn_if_busy()
    shown = argv if argv is not None else sys.argv[1:]
    if args.from_json:  # the run's own command line and load are what the page quotes
        saved = json.loads(args.from_json.read_text())
        studies, shown, load = saved["studies"], saved["argv"], saved["load"]
    else:
        with tempfile.TemporaryDirectory(prefix="bench_cpr-") as tmp:
            studies = [study(name, args, Path(tmp)) for name in args.jobs]
    _plot(studies, args.png)
    text = _markdown(studies, args, shown, load)
    print(text)
    if args.json:
        write_json(args.json, {"studies": studies, "argv": shown, "load": load}, indent=1, default=float)
    if args.markdown:
        update_section(args.markdown, "bench_cpr", text)


if __name__ == "__main__":
    main()
