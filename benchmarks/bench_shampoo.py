"""Distributed Shampoo's cost and benefit on the dense layers.

Two parts:

* **step time** (`--part time`): training steps (forward, backward with
  DDP's all-reduce, optimizer step) of an MLP under Shampoo with
  precondition_frequency 1, 10 and 100 against Adam and Adagrad, on 1 and 2
  gloo processes, each process with the same batch. The figure that matters
  is the whole step's time against Adagrad's (Shampoo's promise is a small
  per-step overhead over diagonal methods); the optimizer step alone is shown
  too. A round is a fresh set of processes in which every variant trains its
  own copy of the model, one step each in turn, so that they all see the same
  machine; a variant's time is the slowest rank's mean step, root
  computations amortised over their frequency; the ratio is the median over
  rounds of the per-round ratio to Adagrad.
* **quality** (`--part quality`): the DLRM main job's model and data, trained
  with each dense optimizer for the same steps (one process); AUC and NE on
  the evaluation set.

    python benchmarks/bench_shampoo.py --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from harness import (
    command_line, machine_summary, markdown_table, per_round_ratios, ratio_cell, rotated, run_ranks, update_section,
)  # fmt: skip

PRESETS = {
    # A wide top MLP (hidden 4096 and 1024 over a 1024-wide input) at a
    # production-like per-process batch: Shampoo's cost per step does not
    # depend on the batch, the step's does (see --batch for the trade-off).
    "wide": dict(widths=[1024, 4096, 1024, 1], batch=4096),
    # The main job's DLRM dense arches (bottom 13-64-16, top 367-128-64-1 on the interaction).
    "dlrm": dict(widths=None, batch=1024),
}
# shampooN[-bf16][-dM]: precondition_frequency N; "-bf16": directions
# all-gathered in bfloat16 (2 processes only; else --communication-dtype);
# "-dM": max_preconditioner_dim M (else --max-preconditioner-dim).
VARIANTS = ["adagrad", "adam", "shampoo1", "shampoo10", "shampoo100", "shampoo10-bf16", "shampoo10-d128"]
SHAMPOO = dict(
    betas=(0.9, 1.0), epsilon=1e-12, momentum=0.0, weight_decay=0.0, grafting="adagrad", grafting_epsilon=1e-10,
)


def build_model(preset: str) -> nn.Module:
    torch.manual_seed(0)
    if preset == "dlrm":
        return _DLRMDense()
    layers: List[nn.Module] = []
    widths = PRESETS[preset]["widths"]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class _DLRMDense(nn.Module):
    """The dense arches of the main job's DLRM, fed pooled embeddings as
    plain inputs (the embedding side is not the dense optimizer's)."""

    def __init__(self, tables: int = 26, dim: int = 16) -> None:
        super().__init__()
        self.tables, self.dim = tables, dim
        self.bottom = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, dim), nn.ReLU())
        pairs = (tables + 1) * tables // 2
        self.top = nn.Sequential(nn.Linear(dim + pairs, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense, pooled = x[:, :13], x[:, 13:].reshape(x.shape[0], self.tables, self.dim)
        d = self.bottom(dense)
        features = torch.cat([d.unsqueeze(1), pooled], dim=1)
        products = features @ features.transpose(1, 2)
        rows, cols = torch.triu_indices(self.tables + 1, self.tables + 1, offset=1)
        return self.top(torch.cat([d, products[:, rows, cols]], dim=1))


def input_width(preset: str) -> int:
    return 13 + 26 * 16 if preset == "dlrm" else PRESETS[preset]["widths"][0]


def _shampoo_settings(variant: str, args) -> Dict:
    """``precondition_frequency`` (0 for other optimizers), communication
    dtype and ``max_preconditioner_dim`` of a variant."""
    if not variant.startswith("shampoo"):
        return dict(frequency=0)
    frequency, *options = variant.removeprefix("shampoo").split("-")
    settings = dict(frequency=int(frequency), dtype=args.communication_dtype, max_dim=args.max_preconditioner_dim)
    for option in options:
        if option == "bf16":
            settings["dtype"] = "bfloat16"
        elif option.startswith("d"):
            settings["max_dim"] = int(option[1:])
        else:
            raise ValueError(f"Invalid variant {variant!r}: unknown option {option!r}.")
    return settings


def make_optimizer(variant: str, params, lr: float, distributed: bool, args, start: int = -1):
    from dist_rec.optim import DDPShampooConfig, DistributedShampoo

    if variant == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if variant == "adam":
        return torch.optim.Adam(params, lr=lr)
    settings = _shampoo_settings(variant, args)
    config = DDPShampooConfig(communication_dtype=getattr(torch, settings["dtype"])) if distributed else None
    return DistributedShampoo(
        params, lr=lr, max_preconditioner_dim=settings["max_dim"], precondition_frequency=settings["frequency"],
        start_preconditioning_step=start, distributed_config=config, **SHAMPOO,
    )  # fmt: skip


def rank_time(rank: int, world_size: int, variants: List[str], preset: str, batch: int, steps: int, warmup: int,
              args) -> Dict[str, Dict]:  # fmt: skip
    """Every variant trains its own copy of the model in these processes, one
    step each in turn (the order rotating), so that all see the same machine
    at the same moments: only the same-run ratios are compared."""
    torch.set_num_threads(1)
    runs = {}
    for variant in variants:
        model = build_model(preset)
        trained = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
        # Preconditioning starts (with a root computation) at the first timed
        # step, so that the window sees the steady state and its root steps.
        optimizer = make_optimizer(variant, trained.parameters(), 0.01, world_size > 1, args, start=warmup + 1)
        frequency = _shampoo_settings(variant, args)["frequency"]
        runs[variant] = dict(model=trained, optimizer=optimizer, frequency=frequency, plain_s=[], plain_opt_s=[],
                             root_s=[], root_opt_s=[], losses=[])  # fmt: skip
    g = torch.Generator().manual_seed(1 + rank)
    teacher = torch.randn(input_width(preset), generator=g)
    batches = []
    for _ in range(4):
        x = torch.randn(batch, input_width(preset), generator=g)
        batches.append((x, (x @ teacher > 0).float()))
    loss_fn = nn.BCEWithLogitsLoss()
    for step in range(warmup + steps):
        x, y = batches[step % len(batches)]
        t = step + 1
        for variant in rotated(variants, step):
            r = runs[variant]
            if world_size > 1:
                dist.barrier()
            start = time.perf_counter()
            loss = loss_fn(r["model"](x).reshape(-1), y)
            r["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            before_step = time.perf_counter()
            r["optimizer"].step()
            end = time.perf_counter()
            if step >= warmup:
                is_root = r["frequency"] and (t - (warmup + 1)) % r["frequency"] == 0
                r["root_s" if is_root else "plain_s"].append(end - start)
                r["root_opt_s" if is_root else "plain_opt_s"].append(end - before_step)
            r["losses"].append(float(loss.detach()))

    def amortised(plain: List[float], root: List[float], frequency: int) -> float:
        """Mean step with one root computation every ``frequency`` steps."""
        if not plain:  # frequency 1: every step computes roots
            return statistics.fmean(root)
        mean = statistics.fmean(plain)
        return mean + (statistics.fmean(root) - mean) / frequency if root else mean

    report = {}
    for variant, r in runs.items():
        optimizer = r["optimizer"]
        state_bytes = optimizer.state_bytes() if hasattr(optimizer, "state_bytes") else sum(
            t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
        )
        report[variant] = dict(
            step_ms=1e3 * amortised(r["plain_s"], r["root_s"], r["frequency"]),
            optimizer_ms=1e3 * amortised(r["plain_opt_s"], r["root_opt_s"], r["frequency"]),
            root_step_ms=1e3 * statistics.fmean(r["root_s"]) if r["root_s"] else None,
            state_bytes=state_bytes, last_loss=r["losses"][-1],
        )  # fmt: skip
    return report


def run(variants: List[str], world: int, preset: str, args) -> Dict[str, Dict]:
    """One round: fresh processes timing every variant, interleaved."""
    batch = args.batch or PRESETS[preset]["batch"]
    ranks = run_ranks(
        rank_time, world, args.timeout, variants=variants, preset=preset, batch=batch, steps=args.steps,
        warmup=args.warmup, args=args,
    )  # fmt: skip
    out = {}
    for variant in variants:
        slowest = max((r[variant] for r in ranks), key=lambda r: r["step_ms"])
        out[variant] = dict(slowest, state_bytes_per_rank=[r[variant]["state_bytes"] for r in ranks])
    return out


def time_part(args) -> str:
    rows = []
    for preset in args.preset:
        for world in args.world:
            variants = [v for v in args.variants if world > 1 or not v.endswith("-bf16")]
            per_round: Dict[str, List[Dict]] = {v: [] for v in variants}
            for round_ in range(args.rounds):
                measured = run(variants, world, preset, args)
                for variant in variants:
                    r = measured[variant]
                    per_round[variant].append(r)
                    print(
                        f"{preset} x{world} round {round_ + 1}: {variant:<11} step {r['step_ms']:8.1f} ms "
                        f"(optimizer {r['optimizer_ms']:7.1f} ms) state/rank {max(r['state_bytes_per_rank']) / 2**20:7.1f} MiB",
                        flush=True,
                    )
            base = per_round["adagrad"]
            for variant in variants:
                runs = per_round[variant]
                rows.append(dict(
                    preset=preset, world=world, variant=variant,
                    step_ms=statistics.median(r["step_ms"] for r in runs),
                    optimizer_ms=statistics.median(r["optimizer_ms"] for r in runs),
                    ratios=per_round_ratios(runs, base),
                    state_mib=max(runs[-1]["state_bytes_per_rank"]) / 2**20,
                ))  # fmt: skip
    header = [
        "model", "processes", "dense optimizer", "step ms", "optimizer step ms", "step vs Adagrad (median; min-max)",
        "optimizer state per rank MiB",
    ]  # fmt: skip
    cells = [
        [r["preset"], r["world"], r["variant"], f"{r['step_ms']:.1f}", f"{r['optimizer_ms']:.1f}",
         ratio_cell(r["ratios"], digits=3, count_rounds=False), f"{r['state_mib']:.2f}"]
        for r in rows
    ]  # fmt: skip
    return markdown_table(header, cells)


def quality_part(args) -> str:
    from dist_rec.config import load_config
    from dist_rec.train import train

    rows = []
    for name, settings in [
        ("adagrad", dict(dense="adagrad", dense_lr=0.02)),
        ("adam", dict(dense="adam", dense_lr=0.001)),
        (f"shampoo (adagrad grafting, max_dim {args.max_preconditioner_dim})", dict(dense="shampoo", dense_lr=0.02)),
        ("shampoo (adagrad grafting, max_dim 128)", dict(dense="shampoo", dense_lr=0.02, max_dim=128)),
    ]:
        config = load_config(args.quality_config)
        config.optimizer.dense, config.optimizer.dense_lr = settings["dense"], settings["dense_lr"]
        if settings["dense"] == "shampoo":
            config.optimizer.shampoo.precondition_frequency = args.quality_frequency
            config.optimizer.shampoo.max_preconditioner_dim = settings.get("max_dim", args.max_preconditioner_dim)
            config.optimizer.shampoo.epsilon = args.quality_epsilon
        config.train.steps = args.quality_steps
        config.train.eval_every = 0
        config.train.output_dir = None
        started = time.perf_counter()
        result = train(config, quiet=True)
        m = result.final_eval
        rows.append((name, m.auc, m.ne, m.log_loss, time.perf_counter() - started))
        print(f"quality: {name:<44} AUC {m.auc:.4f} NE {m.ne:.4f} ({rows[-1][-1]:.0f} s)", flush=True)
    cells = [[n, f"{auc:.4f}", f"{ne:.4f}", f"{ll:.4f}", f"{s:.0f}"] for n, auc, ne, ll, s in rows]
    return markdown_table(["dense optimizer", "AUC", "NE", "log loss", "wall s"], cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["time", "quality"], choices=["time", "quality"])
    parser.add_argument("--preset", nargs="+", default=["wide", "dlrm"], choices=list(PRESETS))
    parser.add_argument("--world", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--batch", type=int, default=0, help="per-process batch (default: the preset's)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps (the first computes Shampoo's roots)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-preconditioner-dim", type=int, default=256)
    parser.add_argument("--communication-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quality-config", default="launch/configs/default.yaml")
    parser.add_argument("--quality-steps", type=int, default=3000)
    parser.add_argument("--quality-frequency", type=int, default=10)
    parser.add_argument("--quality-epsilon", type=float, default=1e-8)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if "adagrad" not in args.variants:
        args.variants = ["adagrad"] + args.variants

    command = command_line(__file__)
    sections = []
    if "time" in args.part:
        table = time_part(args)
        print(table)
        sections.append(
            "Step time. Presets: wide = MLP "
            + "-".join(map(str, PRESETS["wide"]["widths"]))
            + f", B={args.batch or PRESETS['wide']['batch']} per process; dlrm = the main job's dense arches "
            f"(13-64-16 bottom, 367-128-64-1 top over the 27-feature interaction), B={args.batch or PRESETS['dlrm']['batch']} "
            f"per process. One intra-op thread per process; Shampoo max_preconditioner_dim={args.max_preconditioner_dim}, "
            f"AdaGrad grafting, epsilon 1e-12, {args.communication_dtype} all-gather of the search directions on 2 processes "
            f"(blocks spread over the ranks); {args.steps} timed steps after {args.warmup} warm-up; a run's step time is the "
            f"slowest rank's mean step with root computations amortised over their frequency (preconditioning starts, "
            f"with a root computation, at the first timed step: mean of the other steps + (root step - mean) / frequency); "
            f"variants: shampooN = precondition_frequency N, -bf16 = bfloat16 all-gather, -dM = max_preconditioner_dim M; "
            f"{args.rounds} rounds (each a fresh set of processes in which the variants train their own copies of the model, "
            f"one step each in turn).\n\n" + table
        )
    if "quality" in args.part:
        table = quality_part(args)
        print(table)
        sections.append(
            f"Quality: `{args.quality_config}` (the main job's model and data), one process, {args.quality_steps} steps, "
            f"the same sparse optimizer; Shampoo with precondition_frequency {args.quality_frequency}, "
            f"max_preconditioner_dim as named, AdaGrad grafting at Adagrad's learning rate.\n\n" + table
        )
    if args.markdown:
        text = (
            "## Distributed Shampoo (dense optimizer)\n\n"
            f"Command: `{command}` ({time.strftime('%Y-%m-%d')}). {machine_summary()}\n\n" + "\n\n".join(sections)
        )
        update_section(args.markdown, "shampoo", text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
