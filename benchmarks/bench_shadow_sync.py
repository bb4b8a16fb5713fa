"""Background synchronisation of the dense replicas (ShadowSync) against
DDP, the same rules in the foreground, and no sync at all.

Each run trains the main job's data and tables (``launch/configs/default.yaml``)
with a larger dense part (``--dense``/``--over``: ShadowSync's setting, where
the dense layers' sync is what a link pays for) through ``launch/train.sh``
(torchrun), either on one host over loopback or across two "hosts" in
network namespaces (``dist_rec.fault.netns``) whose links are rate limited
with ``tc`` (``--rate``, ``--delay-ms``). Variants (``sync.dense`` /
``sync.mode``):

* ``ddp``: gradients all-reduced in every backward (today's default);
* ``none``: no dense sync at all (the throughput ceiling);
* ``ma_fg``: model averaging in the foreground every step;
* ``ma_fg10``: the same every 10 steps;
* ``ma_bg``, ``easgd_bg``, ``bmuf_bg``: the three rules in the background;
* ``emb_fg``, ``emb_fg10``, ``emb_bg``: 2D (two replica groups, from 4
  processes on) with the embedding replicas averaged in the foreground
  every step, every 10 steps, or in the background (``emb_none``: never,
  the 2D ceiling);
* ``*_i50``: background rounds at least 50 ms apart; ``*_d50``, ``*_d25``:
  paced so that rounds take at most 50% / 25% of the time (``sync.duty``);
  ``bmuf_fg10``: BMUF in the foreground every 10 steps; ``*_fg3``: the
  rules in the foreground every 3 steps (the round rate the background
  reaches at the default ``sync.duty``).

Reported per run: examples/s (the trainer's summary), eval AUC and NE at the
end (the same steps, so the same examples), and the background rounds per
training step; a PNG of eval AUC against step. Variants run one after the
other, in alternated order over ``--rounds``.

    python benchmarks/bench_shadow_sync.py --markdown docs/benchmarks.md --json runs/bench_shadow_sync.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from harness import (
    REPO, busy_note, command_line, machine_summary, markdown_table, update_section, warn_if_busy, write_json,
)  # fmt: skip

sys.path.insert(0, str(REPO))
from dist_rec.fault.netns import Hosts  # noqa: E402
from dist_rec.testing.multi_process import free_port  # noqa: E402

VARIANTS = {
    "ddp": ["sync.dense=ddp"],
    "none": ["sync.dense=none"],
    "ma_fg": ["sync.dense=ma", "sync.mode=foreground", "sync.every=1"],
    "ma_fg10": ["sync.dense=ma", "sync.mode=foreground", "sync.every=10"],
    "ma_bg": ["sync.dense=ma", "sync.mode=background"],
    "easgd_bg": ["sync.dense=easgd", "sync.mode=background"],
    "bmuf_bg": ["sync.dense=bmuf", "sync.mode=background", "sync.every=3"],  # a round per block of 3 steps at most
    # 2D embedding replicas (2 replica groups; 4 or more processes), dense layers under DDP:
    "emb_fg": ["sharding.replicas=2", "sharding.sync_every=1"],
    "emb_fg10": ["sharding.replicas=2", "sharding.sync_every=10"],
    "emb_bg": ["sharding.replicas=2", "sync.embeddings=background"],
    "emb_none": ["sharding.replicas=2", "sharding.sync_every=1000000000"],  # the replicas never agree: the ceiling
}
# The background variants again with a pause of 50 ms between rounds: back to back, the rounds take a core's
# worth of copies and sums from the training on this 2-core machine, and BMUF's block momentum (an effective
# learning rate of eta / (1 - mu) per round) is meant for rounds far apart.
for _name in ("ma_bg", "easgd_bg", "bmuf_bg", "emb_bg"):
    VARIANTS[_name + "_i50"] = [*VARIANTS[_name], "sync.interval_s=0.05"]
    # Paced by a duty cycle: the rounds take at most half / a quarter of the wall time (``sync.duty``).
    VARIANTS[_name + "_d50"] = [*VARIANTS[_name], "sync.duty=0.5"]
    VARIANTS[_name + "_d25"] = [*VARIANTS[_name], "sync.duty=0.25"]
VARIANTS["bmuf_fg10"] = ["sync.dense=bmuf", "sync.mode=foreground", "sync.every=10"]
# The foreground rules every 3 steps: the round rate the background rounds reach at the default duty (0.25).
for _name in ("ma", "easgd", "bmuf"):
    VARIANTS[f"{_name}_fg3"] = [f"sync.dense={_name}", "sync.mode=foreground", "sync.every=3"]



def overrides(args, variant: str, out: Path, world: int) -> List[str]:
    return [
        f"model.dense_arch_layer_sizes=[{','.join(map(str, args.dense))}]",
        f"model.over_arch_layer_sizes=[{','.join(map(str, args.over))}]",
        f"train.batch_size={args.global_batch // world}", f"train.steps={args.steps}",
        f"train.eval_every={max(1, args.steps // 4)}", f"train.log_every={max(1, args.steps // 10)}",
        f"train.output_dir={out}", f"sync.interval_s={args.interval_s}", "sharding.type=table_wise",
        *VARIANTS[variant],
    ]  # fmt: skip


def run(args, variant: str, link: str, nproc: int, root: Path, index: int) -> Dict:
    """One training run; returns its summary's figures."""
    out = root / f"{link}_{nproc}x_{variant}_{index}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    log = open(root / f"{out.name}.log", "w")
    started = time.time()
    if link == "loopback":  # the same process count as two hosts of ``nproc``, on one
        world = 2 * nproc
        env.update(NPROC_PER_NODE=str(world), RDZV_ENDPOINT=f"127.0.0.1:{free_port()}")
        command = ["launch/train.sh", "--config", "launch/configs/default.yaml", *overrides(args, variant, out, world)]
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
        codes = [proc.returncode]
    else:
        world = 2 * nproc
        port = free_port()
        with Hosts(2) as hosts:
            for host in range(2):
                hosts.shape(host, rate=args.rate, delay_ms=args.delay_ms)
            procs = []
            for host in range(2):
                host_env = hosts.env(dict(env, RDZV_ENDPOINT=f"{hosts.address(0)}:{port}", NPROC_PER_NODE=str(nproc),
                                          RDZV_IS_HOST=str(int(host == 0)), LOCAL_ADDR=hosts.address(host),
                                          RDZV_ID=f"shadow{index}{variant}"))  # fmt: skip
                procs.append(hosts.popen(host, ["launch/multi_node.sh", "--config", "launch/configs/default.yaml",
                                                *overrides(args, variant, out, world)],
                                         cwd=REPO, env=host_env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True))  # fmt: skip
            codes = []
            try:
                for proc in procs:
                    codes.append(proc.wait(timeout=args.timeout))
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
    log.close()
    if any(codes):
        raise SystemExit(f"{out.name} failed (exit {codes}); see {root / (out.name + '.log')}")
    summary = json.loads((out / "summary.json").read_text())
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["auc"]) for r in evals if r.get("kind") == "eval" and "auc" in r]
    sync = summary.get("dense_sync") or summary.get("embedding_sync") or {}
    return {
        "variant": variant, "link": link, "processes": world, "seconds": time.time() - started,
        "examples_per_s": summary["examples_per_second"], "auc": summary["eval"]["auc"], "ne": summary["eval"]["ne"],
        "rounds_per_step": sync.get("rounds_per_step"), "curve": curve,
    }  # fmt: skip


def plot(results: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["link"], r["processes"]) for r in results})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, (link, world) in zip(axes[0], keys):
        for variant in VARIANTS:
            runs = [r for r in results if (r["link"], r["processes"], r["variant"]) == (link, world, variant)]
            if runs and runs[0]["curve"]:
                steps, aucs = zip(*runs[0]["curve"])
                ax.plot(steps, aucs, marker="o", ms=3, label=variant)
        ax.set_title(f"{link}, {world} processes")
        ax.set_xlabel("step")
        ax.set_ylabel("eval AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: List[Dict], args, load, argv) -> str:
    import statistics

    rows = []
    for link, world in sorted({(r["link"], r["processes"]) for r in results}):
        group = [r for r in results if (r["link"], r["processes"]) == (link, world)]
        by = {v: [r for r in group if r["variant"] == v] for v in VARIANTS}
        ceilings = {key: statistics.median(r["examples_per_s"] for r in by[key]) if by[key] else None
                    for key in ("none", "emb_none")}  # fmt: skip
        for variant, runs in by.items():
            if not runs:
                continue
            none = ceilings["emb_none" if variant.startswith("emb_") else "none"]
            rate = statistics.median(r["examples_per_s"] for r in runs)
            rounds = runs[0]["rounds_per_step"]
            rows.append([
                link, world, variant, f"{rate:,.0f}", f"{rate / none:.2f}" if none else "-",
                f"{statistics.median(r['auc'] for r in runs):.4f}", f"{statistics.median(r['ne'] for r in runs):.4f}",
                "-" if rounds is None else f"{rounds:.2f}",
            ])  # fmt: skip
    link_text = f"two netns hosts, each link {args.rate} with {args.delay_ms:g} ms of delay (tc tbf/netem)"
    return "\n".join([
        "## Background sync of dense replicas (bench_shadow_sync.py)",
        "",
        f"Command: `{command_line(__file__, argv)}`. Main job data and tables, dense MLP {args.dense} / {args.over}, "
        f"global batch {args.global_batch}, {args.steps} steps, table-wise; loopback: one host; netns: {link_text}. "
        f"Machine: {machine_summary()}.{busy_note(load)} Medians over each variant's runs ({len(results)} runs in all"
        f"{', rendered from ' + ', '.join(str(p) for p in args.from_json) if args.from_json else ''}); "
        "\"vs none\" is examples/s against no sync at all on the same link and process count (`none` for the dense "
        "variants, `emb_none` for the 2D ones).",
        "",
        markdown_table(["link", "processes", "variant", "examples/s", "vs none", "AUC", "NE", "rounds per step"], rows),
        "",
        "![eval AUC against step](images/shadow_sync.png)",
    ])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--links", nargs="+", choices=("loopback", "netns"), default=["loopback", "netns"])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="processes per host (loopback: twice this on one host)")
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="latency added by netem (this VM's kernel has no netem: 0)")
    parser.add_argument("--dense", type=int, nargs="+", default=[256, 128, 16])
    parser.add_argument("--over", type=int, nargs="+", default=[512, 512, 256, 1])
    parser.add_argument("--global-batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--interval-s", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--from-json", type=Path, nargs="+", help="render the table from earlier runs' JSON instead")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "images" / "shadow_sync.png")
    args = parser.parse_args(argv)
    if args.from_json:
        results = [r for path in args.from_json for r in json.loads(path.read_text())]
        plot(results, args.png)
        text = report(results, args, [0.0], argv)
        print(text)
        if args.markdown:
            update_section(args.markdown, "shadow_sync", text)
        return
    load = warn_if_busy()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_shadow_sync_"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for link in args.links:
        for nproc in args.nproc:
            for round_index in range(args.rounds):
                order = args.variants if round_index % 2 == 0 else list(reversed(args.variants))
                for variant in order:
                    if variant.startswith("emb_") and 2 * nproc < 4:
                        continue  # 2D needs two sharding groups of 2
                    result = run(args, variant, link, nproc, root, round_index)
                    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
                    results.append(result)
    if args.json:
        write_json(args.json, results, indent=1)
    plot(results, args.png)
    text = report(results, args, load, argv)
    print(text)
    if args.markdown:
        update_section(args.markdown, "shadow_sync", text)


if __name__ == "__main__":
    main()
