"""DLRM's MLPs run fused (``dist_rec.ops.fused_mlp``: one autograd node, ReLUs
and their gradients in place) against the same arch run as its modules
(``nn.Sequential`` of ``Linear`` and ``ReLU``, autograd node by node).

Two measurements, each alternating the two ways in one process (the arch's
``fused`` switch) so that both meet the same machine:

- ``arches``: the dense and over arches of each preset of
  ``bench_train.py`` alone, forward and backward at its batch and widths;
- ``step``: bench_train's whole dist_rec training step of each preset
  (embeddings, interaction, loss, dense AdaGrad), the MLPs fused or not.

Reported: medians over rounds of each round's median, and the median of the
per-round ratios fused / modules (below 1: the fused MLP is faster).

Usage::

    python benchmarks/bench_mlp.py
    python benchmarks/bench_mlp.py --preset kaggle multihot --rounds 10 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import List

import torch

# harness first: it puts this checkout's dist_rec ahead of an installed one.
from harness import (
    busy_note, command_line, machine_summary, markdown_table, median_seconds, per_round_ratios, ratio_cell,
    run_rounds, update_section, warn_if_busy,
)
import bench_train
from dist_rec.models.dlrm import DenseArch, OverArch

WAYS = ("modules", "fused")


def _set_fused(arches: List[torch.nn.Module], way: str) -> None:
    for arch in arches:
        arch.fused = way == "fused"


def _alternate_ways(arches, step, rounds: int, calls: int, warmup: int, skip: int) -> dict:
    """``{way: [{"ms": median step}, ...per round]}``: both ways warmed up
    first (each its buffers touched), then alternated round by round."""
    for way in WAYS:
        _set_fused(arches, way)
        for _ in range(warmup):
            step()

    def time_way(way: str, round_index: int) -> dict:
        _set_fused(arches, way)
        return {"ms": median_seconds(lambda i: step(), calls, warmup=skip) * 1e3}

    return run_rounds(WAYS, rounds, time_way)


def measure_arches(spec: dict, rounds: int, calls: int) -> dict:
    """``{way: [{"ms": forward + backward of both arches}, ...per round]}``."""
    torch.manual_seed(0)
    features = len(spec["rows"])
    dense_arch = DenseArch(spec["dense"], spec["bottom"])
    over_in = spec["dim"] + (features + 1) * features // 2
    over_arch = OverArch(over_in, spec["top"])
    dense_x = torch.randn(spec["batch"], spec["dense"])
    over_x = torch.randn(spec["batch"], over_in, requires_grad=True)  # the interaction's output needs its gradient
    grads = [torch.randn(spec["batch"], spec["bottom"][-1]), torch.randn(spec["batch"], spec["top"][-1])]

    def step():
        for arch in (dense_arch, over_arch):
            arch.zero_grad(set_to_none=True)
        over_x.grad = None
        torch.autograd.backward([dense_arch(dense_x), over_arch(over_x)], grads)

    return _alternate_ways([dense_arch, over_arch], step, rounds, calls, warmup=5, skip=3)


def measure_step(spec: dict, rounds: int, calls: int, warmup: int) -> dict:
    """``{way: [{"ms": bench_train's dist_rec step}, ...per round]}``."""
    batches = bench_train.make_batches(spec, 32)
    model, optimizer, _ = bench_train.build("dist_rec", spec, batches[0]["keys"])
    inputs = [(b["dense"], bench_train.to_kjt("dist_rec", b), b["labels"]) for b in batches]
    position = [0]

    def step():
        bench_train.train_step(model, optimizer, *inputs[position[0] % len(inputs)])
        position[0] += 1

    return _alternate_ways([model.dense_arch, model.over_arch], step, rounds, calls, warmup=warmup, skip=2)


def summary_row(label: str, per_round: dict) -> list:
    medians = [statistics.median(r["ms"] for r in per_round[way]) for way in WAYS]
    ratios = per_round_ratios(per_round["fused"], per_round["modules"], key="ms")
    return [label, f"{medians[0]:.2f}", f"{medians[1]:.2f}", ratio_cell(ratios, digits=3)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=sorted(bench_train.PRESETS),
                        default=["default", "kaggle", "multihot"])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=10, help="turns each way takes, alternating")
    parser.add_argument("--calls", type=int, default=20, help="timed calls (arches) per round")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per round")
    parser.add_argument("--warmup", type=int, default=40, help="untimed training steps first (bench_train's default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--markdown", type=Path, help="rewrite the mlp section of this page")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = warn_if_busy(args.threads)

    rows = []
    for name in args.preset:
        spec = bench_train.resolve_preset(name, None)
        label = bench_train.describe(spec)
        arches = measure_arches(spec, args.rounds, args.calls)
        rows.append(summary_row(f"{name}: both arches, forward + backward", arches))
        print(rows[-1], flush=True)
        step = measure_step(spec, args.rounds, args.steps, args.warmup)
        rows.append(summary_row(f"{name}: whole dist_rec step ({label})", step))
        print(rows[-1], flush=True)

    table = markdown_table(["measured", "modules ms", "fused ms", "fused / modules (median of rounds; min-max)"], rows)
    print(table)
    if args.markdown:
        text = f"""## Fused MLP: DLRM's arches, fused or as modules (CPU, one process)

Machine: {machine_summary()}; threads: {args.threads}.{busy_note(load)}

Command: `{command_line(__file__, argv)}`.

`fused`: `dist_rec.ops.fused_mlp`, what DLRM's dense and over arches run; `modules`: the same arch
run as its `nn.Sequential` (its `fused` switch off). Both ways alternate in one process for
{args.rounds} rounds, after a warm-up of each way: the two arches alone at each preset's batch and widths
(5 warm-up calls a way, then {args.calls} timed calls a round after 3 untimed), then bench_train.py's whole
dist_rec step ({args.warmup} warm-up steps a way, then {args.steps} timed steps a round after 2 untimed).
Times are medians over rounds of each round's median; the ratio is the median of the per-round ratios.

{table}
"""
        update_section(args.markdown, "mlp", text)


if __name__ == "__main__":
    main()
