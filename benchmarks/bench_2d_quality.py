"""Model quality under 2D sparse parallelism, at equal global batch.

Trains the README main job's DLRM on the synthetic workload (a planted
teacher gives the AUC ceiling) with 4 processes three ways:

* ``full_model_parallel``: tables sharded table-wise over all 4 ranks;
* ``2d_average``: 2 replica groups x 2 ranks, replicas averaged (weights and
  row-wise AdaGrad state) every ``--sync-every`` steps;
* ``2d_momentum_scaled``: the same grid with momentum-scaled row-wise
  AdaGrad (accumulator agreed at sync, local increments scaled by s).

Each variant is one ``launch/train.sh`` run (torchrun, gloo); the script
reads the runs' metrics and writes a table (and an AUC-over-steps plot).

    python benchmarks/bench_2d_quality.py --steps 2000 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from harness import REPO, command_line, machine_summary, markdown_table, update_section


def variants(momentum_scale: float, sync_every: int):
    return {
        "full_model_parallel": ["sharding.type=table_wise", "sharding.replicas=1"],
        "2d_average": ["sharding.type=table_wise", "sharding.replicas=2", f"sharding.sync_every={sync_every}"],
        "2d_momentum_scaled": [
            "sharding.type=table_wise",
            "sharding.replicas=2",
            f"sharding.sync_every={sync_every}",
            "optimizer.sparse=momentum_scaled_rowwise_adagrad",
            f"optimizer.sparse_momentum_scale={momentum_scale}",
        ],
    }


def run_variant(name: str, overrides, args) -> dict:
    out = REPO / "runs" / "quality_2d" / name
    command = [
        str(REPO / "launch" / "train.sh"),
        "--config",
        str(REPO / "launch" / "configs" / "default.yaml"),
        "train.batch_size=512",  # 4 x 512 = the 1D main job's 2 x 1024
        f"train.steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        f"train.log_every={args.eval_every}",
        f"train.output_dir={out}",
        *overrides,
    ]
    env = dict(os.environ, NPROC_PER_NODE="4", RDZV_ENDPOINT=f"127.0.0.1:{args.port}", RDZV_ID=f"quality-{name}")
    print(f"== {name}: {' '.join(overrides)}", flush=True)
    subprocess.run(command, env=env, check=True, cwd=REPO)
    summary = json.loads((out / "summary.json").read_text())
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary["auc_curve"] = [(r["step"], r["auc"]) for r in curve if r.get("kind") == "eval"]
    return summary


def plot(results: dict, teacher: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, summary in results.items():
        steps, aucs = zip(*summary["auc_curve"])
        ax.plot(steps, aucs, marker="o", label=name)
    ax.axhline(teacher, color="grey", linestyle="--", label=f"teacher {teacher:.4f}")
    ax.set_xlabel("step (global batch 2048)")
    ax.set_ylabel("eval AUC")
    ax.set_title("2D sparse parallelism, 4 processes: AUC at equal global batch")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--sync-every", type=int, default=1)
    parser.add_argument("--momentum-scale", type=float, default=2.0)
    parser.add_argument("--port", type=int, default=29631)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "images" / "quality_2d.png")
    args = parser.parse_args()

    results = {name: run_variant(name, overrides, args) for name, overrides in variants(args.momentum_scale, args.sync_every).items()}
    teacher = next(iter(results.values()))["teacher_auc"]
    reference = results["full_model_parallel"]["eval"]["auc"]
    grids = {"full_model_parallel": "1 x 4", "2d_average": "2 x 2", "2d_momentum_scaled": "2 x 2"}
    cells = []
    for name, s in results.items():
        e = s["eval"]
        cells.append([
            name, grids[name], f"{e['auc']:.4f}", f"{e['auc'] - reference:+.4f}", f"{e['ne']:.4f}",
            f"{e['log_loss']:.4f}", f"{s['examples_per_second']:,.0f}",
        ])  # fmt: skip
    table = markdown_table(["variant", "grid", "eval AUC", "AUC - full MP", "NE", "log loss", "ex/s"], cells)
    print(table)
    plot(results, teacher, args.plot)
    if args.markdown:
        command = command_line(__file__)
        text = (
            "## 2D sparse parallelism: quality at equal global batch (CPU, 4 gloo processes)\n\n"
            f"Machine: {machine_summary()}\n\n"
            f"Command: `{command}`\n\n"
            f"The README main job's model and synthetic data (teacher AUC {teacher:.4f}), 4 processes x 512 "
            f"(global batch 2048), {args.steps} steps, tables table-wise inside each sharding group; 2D "
            f"replicas synchronised every {args.sync_every} step(s); momentum-scaled s = {args.momentum_scale}. "
            f"With s = 1, momentum-scaled row-wise AdaGrad is exactly plain averaging (both agree the "
            f"accumulator as m + mean of the replicas' increments).\n\n"
            f"{table}\n\n![AUC over steps](images/{args.plot.name})\n"
        )
        update_section(args.markdown, "quality2d", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
