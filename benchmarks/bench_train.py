"""End-to-end DLRM training step on one process: dist_rec against TorchRec.

The same data and optimizers for every variant; the first three share the
model too, so that only the embedding-bag collection differs:

* ``dist_rec``  ``dist_rec.EmbeddingBagCollection(tables,
                optimizer=RowWiseAdagrad(lr, eps))``: exact row-wise AdaGrad
                fused into the backward;
* ``torchrec``  ``torchrec.modules.fused_embedding_modules.
                FusedEmbeddingBagCollection(tables, optimizer_type=
                torchrec.optim.RowWiseAdagrad, optimizer_kwargs={lr, eps},
                device=cpu)``: FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen``
                with ``EXACT_ROWWISE_ADAGRAD`` fused into the backward, as a
                TorchRec user gets it on one process without sharding. It
                works on the CPU, so no 1-rank ``DistributedModelParallel``
                is needed (that would add the sharding machinery's input
                permutes and output splits on top of the same TBE kernel).
                Note that ``optimizer_type=torch.optim.Adagrad`` would map to
                FBGEMM's element-wise ``EXACT_ADAGRAD``, not the row-wise one;
* ``torchrec_thp`` (optional) the same with ``THP_MEM_ALLOC_ENABLE=1``;
* ``torchrec_dlrm`` (optional) TorchRec's own model,
                ``torchrec.models.dlrm.DLRM`` (the same architecture: bmm
                interaction over the upper triangle), around the same
                ``FusedEmbeddingBagCollection``: what a TorchRec user runs
                end to end. Its MLPs start from dist_rec's weights, so the
                correctness pass checks that the two models compute the same.

The others wrap in ``dist_rec.models.DLRM`` (dot interaction). The tables start
from the same weights (per-table seeded uniform in +-sqrt(1/rows), written
into each collection), the MLPs from the same seed; the sparse optimizer is
exact row-wise AdaGrad with the same lr/eps, the dense optimizer
``torch.optim.Adagrad`` over the MLP parameters on both sides.

Data: ``--batches`` batches from ``dist_rec.data.synthetic.SyntheticDataset``
generated once by the driver (not timed) and loaded by every worker, which
turns them into its own KeyedJaggedTensor (TorchRec's: built with lengths and
offsets and ``sync()``-ed) before timing; the steps cycle through them.

Timed step: forward, BCE-with-logits loss, ``zero_grad``, backward (the
embedding update fused in) and the dense optimizer step. After ``--warmup``
steps, ``--steps`` steps are timed and the median kept. Each variant runs in
its own fresh process per round; the variants take turns (order alternating)
for ``--rounds`` rounds. Reported: each variant's median over rounds of its
per-round medians, and the median over rounds of the per-round ratio
TorchRec / dist_rec step time (the speedup). Each worker also times a few
decomposed steps for a breakdown: embedding forward, embedding-only step
(forward + backward with the fused update, on a fixed output gradient),
dense forward + loss, backward, dense optimizer step.

Before timing, a correctness pass trains dist_rec, ``torchrec`` and (when
benchmarked) ``torchrec_dlrm`` side by side in one process for a few steps
from the same init on the same batches, and fails loudly if a peer's losses
diverge from dist_rec's (the weight differences are printed).

Usage::

    python benchmarks/bench_train.py --preset kaggle --markdown docs/benchmarks.md
    python benchmarks/bench_train.py --preset small
    python benchmarks/bench_train.py --preset kaggle default --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from harness import (
    REPO, busy_note, command_line, machine_summary, markdown_table, median_fields, per_round_ratios, ratio_cell,
    run_rounds, run_worker_process, update_section, warn_if_busy, write_json, write_worker_result,
)  # fmt: skip

# Criteo Kaggle (Display Advertising Challenge) cardinalities of C1..C26, as
# in the DLRM repo's Kaggle runs (33.76M rows in all).
KAGGLE_ROWS = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip

PRESETS = {
    # The DLRM Criteo Kaggle benchmark shape, one id per bag, Zipf ids.
    "kaggle": dict(
        rows=KAGGLE_ROWS, dim=16, bottom=[512, 256, 64, 16], top=[512, 256, 1], batch=2048,
        zipf=1.05, bag=1.0, missing=0.0, dense=13,
    ),
    # The same tables, multi-hot (about 20 ids per bag, as production
    # features and MLPerf's multi-hot Criteo) and 64-wide: the lookups weigh
    # as much as the MLPs. Tables capped at 1M rows (1.4 GB of fp32 in all);
    # mean pooling (sums of 20 rows make the dot interaction blow up).
    "multihot": dict(
        rows=[min(r, 1_000_000) for r in KAGGLE_ROWS], dim=64, bottom=[512, 256, 64], top=[512, 256, 1], batch=2048,
        zipf=1.05, bag=20.0, missing=0.0, dense=13, pooling="mean",
    ),
    # The README main job's model and data (launch/configs/default.yaml), batch 2048.
    "default": dict(config="launch/configs/default.yaml", batch=2048),
    # A smoke run: seconds.
    "small": dict(
        rows=[1000, 50_000, 200_000, 20, 5000, 100_000, 300, 10_000], dim=16, bottom=[64, 16], top=[64, 1],
        batch=512, zipf=1.05, bag=1.0, missing=0.0, dense=13,
    ),
}
VARIANTS = ["dist_rec", "torchrec", "torchrec_thp", "torchrec_dlrm"]
DEFAULT_VARIANTS = ["dist_rec", "torchrec"]
SPARSE_LR, DENSE_LR, EPS = 0.05, 0.02, 1e-8
SEED = 0


# ---------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------


def resolve_preset(name: str, max_rows: Optional[int], presets: Optional[dict] = None) -> dict:
    """The model and data of a preset (of ``presets``, default this file's)
    as plain values (goes to workers as JSON)."""
    preset = dict((presets or PRESETS)[name])
    spec = dict(preset=name, batch=preset.pop("batch"), sparse_lr=SPARSE_LR, dense_lr=DENSE_LR, eps=EPS)
    if "config" in preset:
        from dist_rec.config import load_config

        config = load_config(str(REPO / preset["config"]))
        sizes = list(config.data.num_embeddings_per_feature)
        spec.update(
            rows=sizes * 26 if len(sizes) == 1 else sizes,
            dim=config.model.embedding_dim,
            bottom=list(config.model.dense_arch_layer_sizes),
            top=list(config.model.over_arch_layer_sizes),
            zipf=config.data.zipf_exponent,
            bag=config.data.mean_bag_length,
            missing=config.data.missing_probability,
            dense=config.data.num_dense_features,
            sparse_lr=config.optimizer.sparse_lr,
            dense_lr=config.optimizer.dense_lr,
            eps=config.optimizer.sparse_eps,
            source=preset["config"],
        )
    else:
        spec.update(preset)
    spec["full_rows"] = list(spec["rows"])
    if max_rows:
        spec["rows"] = [min(n, max_rows) for n in spec["rows"]]
    return spec


def describe(spec: dict) -> str:
    cap = f" (capped at {max(spec['rows']):,})" if spec["rows"] != spec["full_rows"] else ""
    return (
        f"{spec['preset']}: {len(spec['rows'])} tables, {sum(spec['rows']) / 1e6:.2f}M rows{cap} x {spec['dim']}, "
        f"MLP {'-'.join(map(str, [spec['dense'], *spec['bottom']]))} / {'-'.join(map(str, spec['top']))}, "
        f"B={spec['batch']}, Zipf {spec['zipf']}, {spec['bag']:g} ids/bag ({spec.get('pooling', 'sum')})"
    )


def make_batches(
    spec: dict, count: int, batch_size: Optional[int] = None, rank: int = 0, world_size: int = 1
) -> List[dict]:
    """``count`` training batches of ``batch_size`` (default: the preset's)
    of one rank of ``world_size`` (rank ``r`` of step ``i``: samples
    ``[i W B + r B, i W B + (r + 1) B)``), as tensors (feature-major)."""
    from dist_rec.data.synthetic import SyntheticConfig, SyntheticDataset

    data = SyntheticDataset(
        SyntheticConfig(
            num_embeddings_per_feature=spec["rows"],
            num_dense_features=spec["dense"],
            zipf_exponent=spec["zipf"],
            mean_bag_length=spec["bag"],
            missing_probability=spec["missing"],
            seed=SEED,
        )
    )
    batches = []
    batches_of_rank = data.batches(batch_size or spec["batch"], rank=rank, world_size=world_size)
    for batch, _ in zip(batches_of_rank, range(count)):
        kjt = batch.sparse_features
        batches.append(
            dict(
                keys=list(kjt.keys()),
                values=kjt.values(),
                lengths=kjt.lengths(),
                offsets=kjt.offsets(),
                dense=batch.dense_features,
                labels=batch.labels,
            )
        )
    return batches


# ---------------------------------------------------------------------------
# Models (built in the workers)
# ---------------------------------------------------------------------------


def table_names(batch: dict) -> List[str]:
    return [f"t_{key}" for key in batch["keys"]]


@torch.no_grad()
def init_tables(ebc: torch.nn.Module, names: List[str], rows: List[int], dim: int) -> None:
    """Writes the shared initial weights into either collection."""
    state = ebc.state_dict()
    for t, (name, n) in enumerate(zip(names, rows)):
        generator = torch.Generator().manual_seed(SEED * 1000 + t)
        bound = (1.0 / n) ** 0.5
        state[f"embedding_bags.{name}.weight"].uniform_(-bound, bound, generator=generator)


def build(variant: str, spec: dict, keys: List[str]):
    """(model, dense optimizer, embedding collection) of one variant."""
    from dist_rec.models.dlrm import DLRM

    names = [f"t_{key}" for key in keys]
    if variant == "dist_rec":
        from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
        from dist_rec.optim import RowWiseAdagrad

        tables = [
            EmbeddingBagConfig(name=name, embedding_dim=spec["dim"], num_embeddings=n, feature_names=[key],
                               pooling=PoolingType(spec.get("pooling", "sum").upper()))
            for name, key, n in zip(names, keys, spec["rows"])
        ]
        ebc = EmbeddingBagCollection(tables=tables, optimizer=RowWiseAdagrad(lr=spec["sparse_lr"], eps=spec["eps"]))
    else:
        import torchrec.optim
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

        tables = [
            EmbeddingBagConfig(name=name, embedding_dim=spec["dim"], num_embeddings=n, feature_names=[key],
                               pooling=PoolingType[spec.get("pooling", "sum").upper()])
            for name, key, n in zip(names, keys, spec["rows"])
        ]
        ebc = FusedEmbeddingBagCollection(
            tables=tables,
            optimizer_type=torchrec.optim.RowWiseAdagrad,
            optimizer_kwargs=dict(lr=spec["sparse_lr"], eps=spec["eps"]),
            device=torch.device("cpu"),
        )
        optimizer = ebc._emb_modules[0]._emb_module.optimizer
        assert len(ebc._emb_modules) == 1 and optimizer.name == "EXACT_ROWWISE_ADAGRAD", optimizer
    init_tables(ebc, names, spec["rows"], spec["dim"])
    torch.manual_seed(SEED)  # the MLPs: same init on both sides
    model = DLRM(ebc, spec["dense"], spec["bottom"], spec["top"])
    if variant == "torchrec_dlrm":
        from torchrec.models.dlrm import DLRM as TorchRecDLRM

        ours, model = model, TorchRecDLRM(ebc, spec["dense"], spec["bottom"], spec["top"])
        with torch.no_grad():
            for mine, theirs in zip(linear_layers(ours), linear_layers(model), strict=True):
                theirs.weight.copy_(mine.weight)
                theirs.bias.copy_(mine.bias)
    dense = [p for n, p in model.named_parameters() if not n.startswith("sparse_arch.")]
    return model, torch.optim.Adagrad(dense, lr=spec["dense_lr"]), ebc


def linear_layers(model: torch.nn.Module) -> List[torch.nn.Linear]:
    """The MLPs' layers in order (bottom, then top): either DLRM's."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _is_dist_rec_model(model) -> bool:
    from dist_rec.models.dlrm import DLRM

    return isinstance(model, DLRM)


def embedding_forward(model, kjt) -> torch.Tensor:
    """Either DLRM's pooled embeddings, ``[B, F, D]``."""
    if _is_dist_rec_model(model):
        pooled = model.sparse_arch(kjt).values()
        return pooled.reshape(pooled.shape[0], model.num_sparse_features, -1)
    return model.sparse_arch(kjt)  # TorchRec's SparseArch


def dense_forward(model, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """Either DLRM's logits from its pooled embeddings ``[B, F, D]``: its
    bottom MLP, interaction and top MLP (DLRM.forward spelled out)."""
    d = model.dense_arch(dense)
    if _is_dist_rec_model(model):
        return model.over_arch(model.inter_arch(d, sparse))
    return model.over_arch(model.inter_arch(dense_features=d, sparse_features=sparse))


def to_kjt(variant: str, batch: dict):
    """The batch's sparse features as the variant's KeyedJaggedTensor (not timed)."""
    if variant == "dist_rec":
        from dist_rec import KeyedJaggedTensor

        kjt = KeyedJaggedTensor(batch["keys"], batch["values"], lengths=batch["lengths"], offsets=batch["offsets"])
        kjt.length_per_key()
        return kjt
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = KeyedJaggedTensor(
        keys=batch["keys"], values=batch["values"], lengths=batch["lengths"], offsets=batch["offsets"]
    )
    return kjt.sync()


def train_step(model, optimizer, dense, kjt, labels) -> torch.Tensor:
    """The timed step."""
    logits = model(dense, kjt)
    loss = F.binary_cross_entropy_with_logits(logits.squeeze(1), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------


def time_variant(variant: str, spec: dict, batches: List[dict], steps: int, warmup: int, phase_steps: int) -> dict:
    t0 = time.perf_counter()
    model, optimizer, ebc = build(variant, spec, batches[0]["keys"])
    inputs = [(b["dense"], to_kjt(variant, b), b["labels"]) for b in batches]
    build_s = time.perf_counter() - t0

    step_ms, losses = [], []
    for i in range(warmup + steps):
        dense, kjt, labels = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        loss = train_step(model, optimizer, dense, kjt, labels)
        t1 = time.perf_counter()
        losses.append(float(loss))
        if i >= warmup:
            step_ms.append((t1 - t0) * 1e3)

    # Breakdown: the same step with its parts timed apart (DLRM.forward spelled out).
    phases: Dict[str, List[float]] = {k: [] for k in ("emb_fwd", "dense_fwd", "backward", "optim", "emb_step", "step")}
    grad = torch.randn(spec["batch"], len(batches[0]["keys"]) * spec["dim"], generator=torch.Generator().manual_seed(1)) * 1e-3
    for i in range(phase_steps):
        dense, kjt, labels = inputs[(warmup + steps + i) % len(inputs)]
        t0 = time.perf_counter()
        sparse = embedding_forward(model, kjt)
        t1 = time.perf_counter()
        logits = dense_forward(model, dense, sparse)
        loss = F.binary_cross_entropy_with_logits(logits.squeeze(1), labels)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        # Embeddings alone: forward + backward with the fused update, next batch.
        _, kjt2, _ = inputs[(warmup + steps + i + 1) % len(inputs)]
        t5 = time.perf_counter()
        ebc(kjt2).values().backward(grad)
        t6 = time.perf_counter()
        for key, seconds in (
            ("emb_fwd", t1 - t0), ("dense_fwd", t2 - t1), ("backward", t3 - t2), ("optim", t4 - t3),
            ("emb_step", t6 - t5), ("step", t4 - t0),
        ):  # fmt: skip
            phases[key].append(seconds * 1e3)
    result = dict(
        step_ms=statistics.median(step_ms),
        examples_per_s=spec["batch"] / statistics.median(step_ms) * 1e3,
        first_losses=losses[:5],
        last_loss=losses[-1],
        build_s=build_s,
        threads=torch.get_num_threads(),
    )
    if phase_steps:
        result["phases_ms"] = {k: statistics.median(v) for k, v in phases.items()}
    return result


CHECKED = ["torchrec", "torchrec_dlrm"]  # trained beside dist_rec in the correctness pass, when benchmarked


def check_variants(spec: dict, batches: List[dict], steps: int, variants: List[str]) -> dict:
    """Trains dist_rec and the other variants side by side from the same
    init; their losses after each step, and each one's largest weight
    difference from dist_rec's at the end."""
    names = ["dist_rec", *(v for v in CHECKED if v in variants or v == "torchrec")]
    models = {v: build(v, spec, batches[0]["keys"]) for v in names}
    inputs = {v: [(b["dense"], to_kjt(v, b), b["labels"]) for b in batches] for v in models}
    losses: Dict[str, List[float]] = {v: [] for v in models}
    for i in range(steps):
        for v, (model, optimizer, _) in models.items():
            losses[v].append(float(train_step(model, optimizer, *inputs[v][i % len(batches)])))

    def largest_difference(a, b) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))

    model, _, ebc = models["dist_rec"]
    tables, layers = ebc.state_dict(), linear_layers(model)
    weight_diff = {}
    for v in names[1:]:
        their_model, _, their_ebc = models[v]
        theirs = their_ebc.state_dict()
        weight_diff[v] = {
            "embedding": largest_difference([tables[k] for k in tables], [theirs[k] for k in tables]),
            "dense": largest_difference([p for m in layers for p in (m.weight, m.bias)],
                                        [p for m in linear_layers(their_model) for p in (m.weight, m.bias)]),
        }  # fmt: skip
    return dict(losses=losses, weight_diff=weight_diff)


def worker_main(args) -> None:
    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec)
    batches = torch.load(args.data)
    if args.worker == "check":
        result = check_variants(spec, batches, args.steps, args.variants)
    else:
        result = time_variant(args.worker, spec, batches, args.steps, args.warmup, args.phase_steps)
    write_worker_result(args.result, result)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run_worker(name: str, spec: dict, data: Path, args, steps: Optional[int] = None) -> dict:
    worker = "torchrec" if name == "torchrec_thp" else name
    worker_args = [
        "--worker", worker, "--spec", json.dumps(spec), "--data", str(data), "--steps", str(steps or args.steps),
        "--warmup", str(args.warmup), "--phase-steps", str(args.phase_steps), "--threads", str(args.threads),
        "--variants", *args.variants,
    ]  # fmt: skip
    return run_worker_process(__file__, worker_args, label=name, thp=name == "torchrec_thp")


def check(spec: dict, data: Path, args) -> dict:
    """The correctness pass; exits if a peer does not train like dist_rec."""
    result = run_worker("check", spec, data, args, steps=args.check_steps)
    ours = result["losses"]["dist_rec"]
    print(f"  check: losses over {len(ours)} steps", flush=True)
    for v, losses in result["losses"].items():
        print(f"    {v:<13} " + " ".join(f"{x:.6f}" for x in losses), flush=True)
    # (a NaN loss counts as an infinite difference: max() would pass over it)
    diffs = {
        v: max(abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf for a, b in zip(ours, theirs))
        for v, theirs in result["losses"].items()
        if v != "dist_rec"
    }
    for v, diff in diffs.items():
        weights = result["weight_diff"][v]
        print(f"    {v}: max |loss diff| {diff:.2e}; max |weight diff| embeddings {weights['embedding']:.2e}, "
              f"dense {weights['dense']:.2e}", flush=True)  # fmt: skip
        if not diff <= args.loss_tolerance:
            raise SystemExit(
                f"CORRECTNESS CHECK FAILED for {spec['preset']}: dist_rec and {v} losses differ by {diff:.3e} "
                f"(> {args.loss_tolerance:g}) from the same init on the same batches."
            )
    result["max_loss_diff"] = max(diffs.values())
    return result


def bench_preset(name: str, args, started: float) -> dict:
    spec = resolve_preset(name, args.max_rows)
    print(f"== {describe(spec)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "batches.pt"
        batches = make_batches(spec, args.batches)
        torch.save(batches, data)
        ids = sum(len(b["values"]) for b in batches) / len(batches)
        del batches
        row = dict(label=describe(spec), spec=spec, ids_per_step=ids)
        if not args.skip_check:
            row["check"] = check(spec, data, args)

        def measure(variant: str, r: int) -> dict:
            result = run_worker(variant, spec, data, args)
            if not all(map(math.isfinite, [*result["first_losses"], result["last_loss"]])):
                print(f"  warning: {variant} trained to a non-finite loss; timings may be off", flush=True)
            print(
                f"[{name} round {r + 1}/{args.rounds} {time.time() - started:5.0f}s] {variant:<13} "
                f"step {result['step_ms']:8.2f} ms  {result['examples_per_s']:9.0f} ex/s",
                flush=True,
            )
            return result

        rounds = run_rounds(args.variants, args.rounds, measure)
    row["rounds"] = rounds
    row["variants"] = {
        v: dict(
            step_ms=statistics.median(x["step_ms"] for x in results),
            phases_ms=median_fields([x.get("phases_ms", {}) for x in results]),
        )
        for v, results in rounds.items()
    }
    for v in row["variants"].values():
        v["examples_per_s"] = spec["batch"] / v["step_ms"] * 1e3
    if "dist_rec" in rounds:
        row["ratios"] = {v: per_round_ratios(rounds[v], rounds["dist_rec"]) for v in rounds if v != "dist_rec"}
    return row


def format_table(rows: List[dict]) -> str:
    others = [v for v in VARIANTS if v != "dist_rec" and any(v in r["variants"] for r in rows)]
    header = ["config", "dist_rec ms", *(f"{v} ms" for v in others), "dist_rec ex/s", *(f"{v} ex/s" for v in others)]
    header += [f"speedup vs {v} (median of rounds; min-max)" for v in others]
    lines = []
    for r in rows:
        v = r["variants"]
        cells = [r["label"], f"{v['dist_rec']['step_ms']:.1f}"]
        cells += [f"{v[o]['step_ms']:.1f}" if o in v else "-" for o in others]
        cells += [f"{v['dist_rec']['examples_per_s']:,.0f}"]
        cells += [f"{v[o]['examples_per_s']:,.0f}" if o in v else "-" for o in others]
        cells += [ratio_cell(r.get("ratios", {}).get(o)) for o in others]
        lines.append(cells)
    return markdown_table(header, lines)


PHASES = [
    ("emb_fwd", "embedding fwd"),
    ("emb_step", "embedding fwd+bwd+update (alone)"),
    ("dense_fwd", "dense fwd + interaction + loss"),
    ("backward", "backward (dense + fused emb update)"),
    ("optim", "dense Adagrad step"),
    ("step", "whole step"),
]


def format_phases(rows: List[dict]) -> str:
    variants = [v for v in VARIANTS if any(v in r["variants"] and r["variants"][v]["phases_ms"] for r in rows)]
    header = ["config", "phase", *(f"{v} ms" for v in variants)]
    lines = []
    for r in rows:
        for key, label in PHASES:
            cells = [r["spec"]["preset"], label]
            cells += [f"{r['variants'][v]['phases_ms'][key]:.1f}" if v in r["variants"] else "-" for v in variants]
            lines.append(cells)
    return markdown_table(header, lines)


def write_markdown(path: Path, table: str, phases: str, command: str, args, rows: List[dict], load: List[float]) -> None:
    checks = "; ".join(
        f"{r['spec']['preset']}: max loss difference {r['check']['max_loss_diff']:.1e} over {args.check_steps} steps"
        for r in rows
        if "check" in r
    )
    own_model = ""
    if "torchrec_dlrm" in args.variants:
        own_model = """
`torchrec_dlrm` is what a TorchRec user runs end to end: TorchRec's own
`torchrec.models.dlrm.DLRM` (the same architecture, its interaction a `bmm`
and an upper-triangle gather) around the same `FusedEmbeddingBagCollection`,
its MLPs started from dist_rec's weights; the correctness pass trains it
beside the others.
"""
    text = f"""## DLRM training step, end to end (CPU, one process)

Machine: {machine_summary(torchrec=True)}; threads: {args.threads}.{busy_note(load)}

Command: `{command}` ({datetime.date.today().isoformat()}).

Same model (`dist_rec.models.DLRM`, its MLPs run by `dist_rec.ops.fused_mlp`),
data and optimizers for dist_rec and `torchrec`; only the embedding-bag
collection differs: dist_rec's `EmbeddingBagCollection` with the fused
`RowWiseAdagrad`, against TorchRec's `FusedEmbeddingBagCollection` with
`torchrec.optim.RowWiseAdagrad` (FBGEMM TBE, `EXACT_ROWWISE_ADAGRAD`,
fused into the backward). Same initial weights, lr/eps, and dense
`torch.optim.Adagrad`. A timed step is forward, BCE-with-logits loss,
`zero_grad`, backward (embedding update fused in) and the dense optimizer
step, on {args.batches} pre-generated synthetic batches (Zipf ids) that the
steps cycle through; data generation and conversion to each library's
KeyedJaggedTensor are not timed. Each variant runs in a fresh process per
round ({args.warmup} warm-up + {args.steps} timed steps, median), variants
alternating for {args.rounds} rounds; step times are medians over rounds, the
speedup is the median of the per-round ratios TorchRec / dist_rec.
Correctness pass before timing (trained side by side from the same init,
the largest loss difference from dist_rec's): {checks or "skipped"}.
{own_model}
{table}

Where the time goes (medians of {args.phase_steps} decomposed steps per round, timed
apart, so they add up to a little more than the step). "Embedding ... alone" is
a separate embedding-only step on a fixed output gradient; the dense backward
is roughly backward - (embedding alone - embedding fwd):

{phases}
"""
    update_section(path, "train", text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["kaggle"])
    parser.add_argument("--max-rows", type=int, default=None, help="cap every table at this many rows (memory)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=DEFAULT_VARIANTS)
    parser.add_argument("--batches", type=int, default=32, help="pre-generated batches the steps cycle through")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    # On kaggle (5-10M-row tables) both libraries took 10-35 steps to settle (2026-12-07, AMD EPYC): about
    # 10,000 page faults in the first step and thousands in some of the next 30 (optimizer state and
    # buffers first touched); TorchRec's steps 5-35 had a median of 77 ms against 60 ms for steps 40-80.
    parser.add_argument("--warmup", type=int, default=40, help="untimed steps first, per round (steady state)")
    parser.add_argument("--phase-steps", type=int, default=8, help="decomposed steps per round for the breakdown")
    parser.add_argument("--rounds", type=int, default=5, help="turns each variant takes")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--check-steps", type=int, default=5, help="steps of the correctness pass")
    parser.add_argument("--loss-tolerance", type=float, default=1e-4)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--markdown", type=Path, help="rewrite the train section of this page")
    parser.add_argument("--json", type=Path, help="write all measurements as JSON")
    # Internal: one variant in a worker process.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if "dist_rec" not in args.variants:
        parser.error("--variants must include dist_rec (the ratios are against it)")
    if args.batches < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--batches, --steps and --rounds must be >= 1")

    # With every core's worth of OpenMP threads, a busy machine makes steps
    # many times slower, and unevenly so between variants.
    load = warn_if_busy(args.threads)
    started = time.time()
    rows = [bench_preset(name, args, started) for name in args.preset]
    report("bench_train.py", argv, args, rows, load, format_table, format_phases, write_markdown)


def report(script, argv, args, rows, load, format_table, format_phases, write_markdown) -> None:
    """Prints the tables and writes ``--json`` / ``--markdown`` (shared with
    bench_sharded.py)."""
    table, phases = format_table(rows), format_phases(rows)
    print()
    print(table)
    print()
    print(phases)
    command = command_line(script, argv)
    if args.markdown:
        write_markdown(args.markdown, table, phases, command, args, rows, load)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "worker", "spec", "data", "result")}
        write_json(args.json, dict(machine=machine_summary(), command=command, settings=settings, load_average=load,
                                   rows=rows), indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
