"""Recovery from a dead rank, side by side: 1D partial recovery, 2D replica
rebuild, and the full restart TorchRec users rely on today.

The same DLRM job (synthetic Zipf data, tables of ``--sizes`` GiB, table-wise
sharding, checkpoints every ``--checkpoint-every`` steps) runs once without
a failure and once with rank 1 (1D) or rank 2 (2D) SIGKILLed after step
``--kill-step``, for each way of recovering:

* **1D partial recovery** (``dist_rec.fault.launch``, 2 processes): the
  survivor keeps its memory, the replacement loads only its own shards;
* **2D replica rebuild** (``dist_rec.fault.launch``, 4 processes as 2 x 2):
  the other replica group trains on, the replacement copies its shards from
  the live replica;
* **full restart** (``torchrun --max-restarts 1``, 2 processes): every rank
  restarts and reloads the checkpoint.

From the runs' event logs (``fault_events.jsonl``: every step, the kill)
and summaries it reports, per way and size: the seconds from the kill to
the first completed step after it (for 2D: of the survivors, and of the
failed replica group), the steps the survivors lost, the bytes moved to
restore, the samples lost, and the final AUC against the fault-free run.
A PNG shows every run's steps against the time since the kill.

    python benchmarks/bench_recovery.py --sizes 1 8 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from harness import (
    REPO, busy_note, command_line, machine_summary, markdown_table, update_section, warn_if_busy, write_json,
)  # fmt: skip

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_rec.checkpoint import CheckpointReader  # noqa: E402
from dist_rec.testing.multi_process import free_port  # noqa: E402

TABLES = 8
DIM = 64
# 2D replicas are averaged whole (every row) at a sync: every step would move
# the whole tables each step (0.6 s a step at 1 GiB here), so every 100 steps.
SYNC_EVERY = 100
WAYS = ("1d", "2d", "restart")
NAMES = {"1d": "1D partial recovery", "2d": "2D replica rebuild", "restart": "full restart (torchrun --max-restarts)"}



def job_overrides(size_gib: float, out: Path, steps: int, every: int, world: int, replicas: int) -> List[str]:
    rows = int(size_gib * (1 << 30) / (TABLES * DIM * 4))
    return [
        f"data.num_embeddings_per_feature=[{','.join([str(rows)] * TABLES)}]", "data.num_dense_features=13",
        "data.eval_samples=65536", f"model.embedding_dim={DIM}", f"model.dense_arch_layer_sizes=[128,{DIM}]",
        "model.over_arch_layer_sizes=[256,64,1]", "model.meta_init=true", "sharding.type=table_wise",
        f"sharding.replicas={replicas}", f"sharding.sync_every={SYNC_EVERY if replicas > 1 else 1}",
        f"train.batch_size={2048 // world}", f"train.steps={steps}",
        "train.eval_every=0", "train.log_every=250", f"train.output_dir={out}", f"train.checkpoint_dir={out / 'ckpt'}",
        f"train.checkpoint_every={every}", "fault.timeout_s=60",
        # Synchronous saves: every way restores from the same step, and a 2 x 2 job at 8 GiB fits in this
        # machine's 24 GiB without the background writer's host copy of each shard.
        "checkpoint.async_save=false",
    ]  # fmt: skip


def run(way: str, size: float, root: Path, args, kill: Optional[int]) -> Dict:
    """One run; returns what its summary and events say."""
    world, replicas = (4, 2) if way == "2d" else (2, 1)
    out = root / f"{way}_{size:g}gib_{'kill' if kill else 'clean'}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = job_overrides(size, out, args.steps, args.checkpoint_every, world, replicas)
    victim = 2 if way == "2d" else 1
    if kill:
        overrides.append(f'fault.inject=["rank={victim} step={kill}"]')
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if way == "restart":
        env.update(PYTHON=sys.executable, NPROC_PER_NODE=str(world), MAX_RESTARTS="1",
                   RDZV_ENDPOINT=f"127.0.0.1:{free_port()}")  # fmt: skip
        command = ["launch/train.sh", "--config", "launch/configs/default.yaml", *overrides]
    else:
        command = [sys.executable, "-m", "dist_rec.fault.launch", "--nproc-per-node", str(world),
                   "--store", f"127.0.0.1:{free_port()}", "-m", "dist_rec.train", "--config",
                   "launch/configs/default.yaml", *overrides]  # fmt: skip
    started = time.time()
    with open(root / f"{out.name}.log", "w") as log:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{out.name} failed (exit {proc.returncode}); see {root / (out.name + '.log')}")
    summary = json.loads((out / "summary.json").read_text())
    result = {"way": way, "size_gib": size, "kill": kill, "seconds": time.time() - started,
              "auc": summary["eval"]["auc"], "ne": summary["eval"]["ne"], "steps": summary["steps"],
              "lost_samples_reported": summary.get("lost_samples", 0)}  # fmt: skip
    if kill:
        result.update(_failure_figures(way, out, victim, args))
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    return result


def _failure_figures(way: str, out: Path, victim: int, args) -> Dict:
    events = [json.loads(line) for line in (out / "fault_events.jsonl").read_text().splitlines()]
    (kill,) = [e for e in events if e["event"] == "injected"]
    t_kill = kill["time"]
    steps = [e for e in events if e["event"] == "step"]
    group = {0, 1} if way != "2d" else {2, 3}  # the ranks the failure stopped
    survivors = {0} if way != "2d" else {0, 1}
    after = [e for e in steps if e["time"] > t_kill and e["step"] > kill["step"]]  # steps past the one that failed
    first_any = min((e["time"] for e in after if e["rank"] in survivors), default=None)
    first_group = min((e["time"] for e in after if e["rank"] in group), default=None)
    restored = [e for e in events if e["event"] == "restored"]
    before = kill["step"]  # no survivor can complete the step after it without the dead rank
    if way == "restart":  # the restarted processes (torchrun's restart count 1) start at the checkpoint
        resumed = min((e["step"] for e in steps if e["incarnation"] > 0), default=before + 1) - 1
    else:  # the survivors' first epoch after the kill resumed at the agreed step
        resumed = min((e["resume_step"] for e in restored if e["rank"] in survivors and e["time"] > t_kill), default=before)
    if way == "restart":
        newest = CheckpointReader.find(out / "ckpt") if (out / "ckpt").exists() else None
        manifest = json.loads((newest / "manifest.json").read_text()) if newest is not None else None
        moved = sum(f["bytes"] for f in manifest["files"]) if manifest else 0  # every rank reloads the checkpoint
        lost = (kill["step"] - resumed) * 2048  # every sample since the checkpoint is trained again
    else:
        moved = sum(e.get("own_restored_bytes", 0) for e in restored)
        lost = None
    timeline = sorted((round(e["time"] - t_kill, 3), e["step"], e["rank"]) for e in steps if e["rank"] in survivors | group)
    return {
        "kill_step": kill["step"],
        "to_first_step_s": None if first_any is None else first_any - t_kill,
        "group_back_s": None if first_group is None else first_group - t_kill,
        "survivor_steps_lost": max(0, before - resumed),
        "restored_bytes": moved,
        "lost_samples": lost,
        "timeline": timeline[:: max(1, len(timeline) // 4000)],
    }


def plot(results: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size_gib"] for r in results if r["kill"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    colours = {"1d": "tab:blue", "2d": "tab:green", "restart": "tab:red"}
    for ax, size in zip(axes[0], sizes):
        for r in results:
            if r["kill"] and r["size_gib"] == size:
                t = [p[0] for p in r["timeline"] if -10 <= p[0] <= 60]
                s = [p[1] for p in r["timeline"] if -10 <= p[0] <= 60]
                ax.plot(t, s, ".", ms=1.5, color=colours[r["way"]], label=NAMES[r["way"]])
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("seconds since the kill")
        ax.set_ylabel("step completed (any rank)")
        ax.set_title(f"{size:g} GiB of tables")
        ax.legend(markerscale=6, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: List[Dict], args, load, argv) -> str:
    clean = {(r["way"], r["size_gib"]): r for r in results if not r["kill"]}
    rows = []
    for r in results:
        if not r["kill"]:
            continue
        ref = clean.get((r["way"], r["size_gib"])) or clean[("1d", r["size_gib"])]
        back = f"{r['to_first_step_s']:.1f} s" if r["to_first_step_s"] is not None else "-"
        if r["way"] == "2d":
            back = f"{r['to_first_step_s']:.1f} s (failed group: {r['group_back_s']:.1f} s)"
        lost = r["lost_samples"] if r["lost_samples"] is not None else r["lost_samples_reported"]
        rows.append([
            f"{r['size_gib']:g} GiB", NAMES[r["way"]], back, r["survivor_steps_lost"],
            f"{r['restored_bytes'] / 2**30:.2f} GiB", f"{lost:,}", f"{r['auc']:.4f} ({r['auc'] - ref['auc']:+.4f})",
        ])  # fmt: skip
    restart = {r["size_gib"]: r["to_first_step_s"] for r in results if r["kill"] and r["way"] == "restart"}
    speedups = []
    for r in results:
        if r["kill"] and r["way"] != "restart" and r["size_gib"] in restart:
            own = r["group_back_s"] if r["way"] == "2d" else r["to_first_step_s"]
            speedups.append(f"{NAMES[r['way']]} at {r['size_gib']:g} GiB: {restart[r['size_gib']] / own:.1f}x sooner")
    return "\n".join([
        "## Recovery from a dead rank (CPU, gloo processes)",
        "",
        f"Command: `{command_line(__file__, argv)}` ({TABLES} tables x dim {DIM}, table-wise, global batch 2048, "
        f"2D replicas synchronised every {SYNC_EVERY} steps, "
        f"{args.steps} steps, checkpoint every {args.checkpoint_every}, SIGKILL after step {args.kill_step}). "
        f"Machine: {machine_summary()}.{busy_note(load)}",
        "",
        "Seconds: from the kill to the first step any survivor completes after it (2D: and the failed replica "
        "group's first step, i.e. its replacement started, rebuilt and rejoined). Steps lost: steps the survivors "
        "trained before the kill and had to train again. Bytes: moved to restore state (replica copy, the lost "
        "shard's checkpoint files, or for a full restart every checkpoint file). Samples lost: samples whose updates "
        "to some shard were lost (partial recovery: since the checkpoint, on the lost shard; full restart: every "
        "sample since the checkpoint is trained again). AUC against the fault-free run of the same job.",
        "",
        markdown_table(["tables", "recovery", "kill -> next step", "survivor steps lost", "restored", "samples lost",
                        "final AUC (vs fault-free)"], rows),  # fmt: skip
        "",
        "Resumed sooner than the full restart: " + "; ".join(speedups) + ".",
        "",
        "![steps against time since the kill](recovery.png)",
    ])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0], help="GiB of tables")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--kill-step", type=int, default=1200)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=None, help="where runs write (default: a temporary directory)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "recovery.png")
    args = parser.parse_args(argv)
    load = warn_if_busy()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_recovery_"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        for way in args.ways:
            for kill in (None, args.kill_step):
                if way == "restart" and kill is None and "1d" in args.ways:
                    continue  # the 1D fault-free run is the same job (same model, data, sharding, global batch)
                result = run(way, size, root, args, kill)
                print(json.dumps({k: v for k, v in result.items() if k != "timeline"}), flush=True)
                results.append(result)
    if args.json:
        write_json(args.json, results, indent=1)
    plot(results, args.png)
    text = report(results, args, load, argv)
    print(text)
    if args.markdown:
        update_section(args.markdown, "recovery", text)


if __name__ == "__main__":
    main()
