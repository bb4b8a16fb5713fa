"""Sharded DLRM training on CPU processes joined by gloo: dist_rec against
TorchRec's ``DistributedModelParallel``.

``W`` processes (``--world``, spawned on loopback with gloo by
``dist_rec.testing.multi_process``) train one ``dist_rec.models.DLRM``
together: every process takes its own batch of ``B`` samples (the global
batch is ``W x B``), the tables are sharded over the processes (every table
table-wise, or every table row-wise), the MLPs are replicated under DDP.
Variants (``<library>_<tw|rw>``):

* ``dist_rec_tw`` / ``dist_rec_rw``
      ``dist_rec.sharding.DistributedModelParallel(DLRM(dist_rec.
      EmbeddingBagCollection(tables, optimizer=RowWiseAdagrad(lr, eps)), ...),
      sharding_type="table_wise" | "row_wise")``, ``dmp.sync()`` after the
      optimizer step as its API asks (a no-op here: one replica); its
      sharding all-to-alls go through shared memory (the processes share a
      host: ``dist_rec.distributed.shm_transport``, dist_rec's default;
      ``DIST_REC_INTRA_HOST_ALL_TO_ALL=gloo`` keeps them on gloo);
* ``torchrec_tw`` / ``torchrec_rw``
      ``torchrec.distributed.DistributedModelParallel`` over the same DLRM
      holding a ``torchrec.EmbeddingBagCollection`` built on ``meta``, its
      tables marked with ``apply_optimizer_in_backward(torchrec.optim.
      RowWiseAdagrad, lr, eps)`` (FBGEMM TBE, ``EXACT_ROWWISE_ADAGRAD``
      fused into the backward), a plan from ``EmbeddingShardingPlanner``
      (CPU topology, every table constrained to the sharding type through
      ``ParameterConstraints``), ``EmbeddingBagCollectionSharder``; DMP puts
      the dense part under DDP itself. See ``_torchrec_dmp.py`` (row-wise
      needs a sharder that offers it on the CPU: TorchRec 1.8.0 lists it for
      CUDA only).

Same model, initial weights (tables: per-table seeded uniform in
+-sqrt(1/rows); MLPs: same seed), data and optimizers on both sides: sparse
exact row-wise AdaGrad with the same lr/eps fused into the backward, dense
``torch.optim.Adagrad`` over the non-embedding parameters (for TorchRec the
``KeyedOptimizerWrapper`` over DMP's non-fused parameters, as its DLRM
example).

Data: ``--batches`` batches per process from
``dist_rec.data.synthetic.SyntheticDataset`` (rank ``r`` gets samples
``[r B, (r + 1) B)`` of every global batch, as the training job reads them),
generated once by the driver (not timed); each process turns its batches into
its library's KeyedJaggedTensor before timing and the steps cycle through
them.

Timed step, on every process: forward (input all-to-all, lookups, output
all-to-all / reduce-scatter, MLPs), BCE-with-logits loss (mean over the
process's batch), ``zero_grad``, backward (DDP all-reduce of the dense
gradients, the embedding gradients sent back to their shards and the fused
update) and the dense optimizer step. After ``--warmup`` steps, ``--steps``
steps are timed; a run's step time is the slowest process's median (the
processes run in lock-step). Every run is a fresh set of processes; the
variants take turns (order alternating) for ``--rounds`` rounds. Reported
per (preset, processes, sharding type): each library's median over rounds,
examples/s of the whole job (``W x B / step``) and the speedup, the median over
rounds of the per-round ratio TorchRec / dist_rec step time.

Train loops (``--loop``): ``plain`` is the step above, called by the
benchmark; ``pipeline`` is each library's own train pipeline, which starts
the input dist of the next batch while the current one trains (dist_rec:
``dist_rec.sharding.pipeline.TrainPipelineSparseDist``; TorchRec:
``torchrec.distributed.train_pipeline.TrainPipelineSparseDist`` on the CPU,
its DMP wrapping ``_torchrec_dmp.TrainModule``, the same DLRM and loss
behind TorchRec's ``model(batch) -> (loss, output)`` interface). A pipelined
step is one ``progress`` call (zero_grad, forward, backward, dense step;
dist_rec's also calls ``dmp.sync()``), fed one batch more than it trains so
that the last timed step also sends a next batch.

Correctness pass, before timing, per (preset, processes, sharding type): on
``W`` processes, each library's sharded model trains ``--check-steps`` steps
from the shared init; rank 0 also trains an unsharded reference (TorchRec's
``FusedEmbeddingBagCollection``, the model of ``bench_train.py``, which that
benchmark checks against dist_rec's) on the global batches (the ``W``
processes' batches in rank order). Sharded training must be one step on the
global batch: the mean of the processes' losses must match the reference's
loss on the global batch, and the weights after the last step must match the
reference's, for every loop (dense for both libraries; tables gathered from TorchRec's
ShardedTensors and by dist_rec's ``ShardedEmbeddingBagCollection.
gather_unsharded()``). Dense gradients are DDP averages, so
exactly the global batch's; TorchRec sums the embedding gradients of the
processes' mean losses (``W`` times the global batch's mean): row-wise AdaGrad
(``w -= lr g / (sqrt(G) + eps)``, ``G`` accumulating mean ``g^2``) makes the
same update for any constant scale of ``g`` up to ``eps``, so either
convention passes.

Usage::

    python benchmarks/bench_sharded.py --preset default multihot --world 2 4 --markdown docs/benchmarks.md
    python benchmarks/bench_sharded.py --preset small --variants torchrec_tw torchrec_rw --steps 5 --rounds 1
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import bench_train
from dist_rec.trainer.environment import default_threads
from bench_train import KAGGLE_ROWS, SEED, describe, init_tables, to_kjt
from harness import (
    busy_note, machine_summary, markdown_table, median_fields, per_round_ratios, ratio_cell, run_ranks, run_rounds,
    update_section, warn_if_busy,
)  # fmt: skip

PRESETS = {
    # The README main job (launch/configs/default.yaml): 26 tables, 0.19M
    # rows x 16, one id per bag, B=1024 per process.
    "default": dict(config="launch/configs/default.yaml", batch=1024),
    # bench_train's multihot workload (about 20 ids per bag, 64 wide, mean
    # pooling) with the tables capped at 500k rows (3.07M rows, 0.8 GB of
    # fp32 in all) and B=1024 per process, to fit 2 cores and 24 GB with 4
    # processes and the correctness pass's unsharded reference.
    "multihot": dict(
        rows=[min(r, 500_000) for r in KAGGLE_ROWS], dim=64, bottom=[512, 256, 64], top=[512, 256, 1], batch=1024,
        zipf=1.05, bag=20.0, missing=0.0, dense=13, pooling="mean",
        # Smaller steps than bench_train's: with those its loss spikes to ~22
        # at step 2 (every library and the reference alike), which magnifies
        # float rounding beyond any sensible tolerance.
        dense_lr=0.002, sparse_lr=0.01,
    ),
    # A smoke run: seconds.
    "small": dict(
        rows=[1000, 50_000, 200_000, 20, 5000, 100_000, 300, 10_000], dim=16, bottom=[64, 16], top=[64, 1],
        batch=256, zipf=1.05, bag=1.0, missing=0.0, dense=13,
    ),
}  # fmt: skip
LIBRARIES = ("dist_rec", "torchrec")
SHARDINGS = {"tw": "table_wise", "rw": "row_wise"}
VARIANTS = [f"{lib}_{s}" for s in SHARDINGS for lib in LIBRARIES]
LOOPS = ("plain", "pipeline")
SPARSE_LR, DENSE_LR, EPS = 0.05, 0.02, 1e-8


def split_variant(variant: str) -> Tuple[str, str]:
    """``"torchrec_rw"`` -> ``("torchrec", "row_wise")``."""
    library, short = variant.rsplit("_", 1)
    return library, SHARDINGS[short]


# ---------------------------------------------------------------------------
# Workload (the driver)
# ---------------------------------------------------------------------------


def resolve_preset(name: str, max_rows: Optional[int]) -> dict:
    """The model and data of a preset as plain values (goes to the ranks)."""
    return bench_train.resolve_preset(name, max_rows, PRESETS)


def make_batches(spec: dict, count: int, batch_size: int, rank: int = 0, world_size: int = 1) -> List[dict]:
    """``count`` batches of ``batch_size`` of one rank of ``world_size``, as
    ``bench_train.make_batches`` makes them."""
    return bench_train.make_batches(spec, count, batch_size, rank, world_size)


# ---------------------------------------------------------------------------
# Sharded models (built in the ranks)
# ---------------------------------------------------------------------------


def full_table(spec: dict, table_index: int) -> torch.Tensor:
    """Table ``table_index``'s initial weights, as ``bench_train.init_tables``
    writes them."""
    n = spec["rows"][table_index]
    generator = torch.Generator().manual_seed(SEED * 1000 + table_index)
    bound = (1.0 / n) ** 0.5
    return torch.empty(n, spec["dim"]).uniform_(-bound, bound, generator=generator)


def make_dlrm(spec: dict, ebc):
    from dist_rec.models.dlrm import DLRM

    torch.manual_seed(SEED)  # the MLPs: same init on every side
    return DLRM(ebc, spec["dense"], spec["bottom"], spec["top"])


def make_torchrec_dlrm(spec: dict, ebc):
    """``torchrec.models.dlrm.DLRM`` over ``ebc`` (what TorchRec users
    train), its MLP weights copied from ``make_dlrm``'s (same layers, in
    order), so that both libraries start from the same model."""
    from torchrec.models.dlrm import DLRM as TorchRecDLRM

    ours = make_dlrm(spec, ebc)
    theirs = TorchRecDLRM(
        embedding_bag_collection=ebc, dense_in_features=spec["dense"], dense_arch_layer_sizes=spec["bottom"],
        over_arch_layer_sizes=spec["top"], dense_device=torch.device("cpu"),
    )  # fmt: skip
    with torch.no_grad():
        for arch in ("dense_arch", "over_arch"):
            for name, value in _linear_state(getattr(theirs, arch), arch).items():
                value.copy_(_linear_state(getattr(ours, arch), arch)[name])
    return theirs


def torchrec_model_builder(spec: dict):
    """The DLRM the TorchRec side trains: TorchRec's own (``--torchrec-model
    torchrec``, the default) or dist_rec's (``dist_rec``: isolates the
    embedding and sharding stack, both sides then share the dense code)."""
    return make_dlrm if spec.get("torchrec_model", "torchrec") == "dist_rec" else make_torchrec_dlrm


def _linear_state(module: torch.nn.Module, prefix: str) -> Dict[str, torch.Tensor]:
    """``{prefix}.linear{k}.weight|bias`` of the k-th ``nn.Linear`` under
    ``module``, in order: the MLP weights under names both libraries' DLRMs
    share (their module trees differ)."""
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    out = {}
    for k, linear in enumerate(linears):
        out[f"{prefix}.linear{k}.weight"] = linear.weight
        out[f"{prefix}.linear{k}.bias"] = linear.bias
    return out


def dense_parameter_count(spec: dict) -> int:
    return 2 * (len(spec["bottom"]) + len(spec["top"]))  # weight and bias of every Linear


def dist_rec_sharding_api():
    """``dist_rec.sharding.DistributedModelParallel``, or None with the reason."""
    try:
        from dist_rec.sharding import DistributedModelParallel
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"
    return DistributedModelParallel, ""


def build_sharded(library: str, sharding_type: str, spec: dict, keys: List[str], loop: str = "plain"):
    """``(dmp, dense optimizer, info)`` of one library on this rank; with
    ``loop="pipeline"`` TorchRec's model is wrapped for its pipeline
    (``model(batch) -> (loss, logits)``)."""
    names = [f"t_{key}" for key in keys]
    pooling = spec.get("pooling", "sum")
    if library == "torchrec":
        import _torchrec_dmp

        configs = _torchrec_dmp.tables(names, keys, spec["rows"], spec["dim"], pooling)
        wrap = _torchrec_dmp.TrainModule if loop == "pipeline" else (lambda model: model)
        dmp, optimizer = _torchrec_dmp.build_dmp(
            configs, lambda ebc: wrap(torchrec_model_builder(spec)(spec, ebc)), sharding_type, spec["sparse_lr"], spec["eps"],
            spec["dense_lr"], spec["batch"], reorder=torchrec_model_builder(spec) is make_dlrm,
        )  # fmt: skip
        _torchrec_dmp.load_tables(dmp, lambda name: full_table(spec, names.index(name)))
        info = dict(plan=_torchrec_dmp.plan_summary(dmp), fused=_torchrec_dmp.fused_optimizer_names(dmp))
        bad = [name for name in info["fused"] if name != "EXACT_ROWWISE_ADAGRAD"]
        if not info["fused"] or bad:
            raise RuntimeError(
                f"TorchRec's sharded tables are not under a fused EXACT_ROWWISE_ADAGRAD: {info['fused']}"
            )
        dense = [p for group in optimizer.param_groups for p in group["params"]]
    elif library == "dist_rec":
        from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
        from dist_rec.optim import RowWiseAdagrad

        DistributedModelParallel, why = dist_rec_sharding_api()
        if DistributedModelParallel is None:
            raise RuntimeError(f"dist_rec.sharding.DistributedModelParallel is not available ({why}).")
        tables = [
            EmbeddingBagConfig(name=name, embedding_dim=spec["dim"], num_embeddings=n, feature_names=[key],
                               pooling=PoolingType(pooling.upper()))
            for name, key, n in zip(names, keys, spec["rows"])
        ]  # fmt: skip
        ebc = EmbeddingBagCollection(tables=tables, optimizer=RowWiseAdagrad(lr=spec["sparse_lr"], eps=spec["eps"]))
        init_tables(ebc, names, spec["rows"], spec["dim"])  # every rank the whole table; DMP keeps its shards
        dmp = DistributedModelParallel(make_dlrm(spec, ebc), sharding_type=sharding_type)
        dense = [p for name, p in dmp.named_parameters() if "sparse_arch" not in name]
        optimizer = torch.optim.Adagrad(dense, lr=spec["dense_lr"])
        info = dict(
            plan={
                name: [t.sharding_type, "dist_rec", t.ranks]
                for plan in getattr(dmp, "plans", {}).values()
                for name, t in plan.tables.items()
            }
        )
    else:
        raise ValueError(f"Invalid library={library!r}. Must be one of {', '.join(LIBRARIES)}.")
    if len(dense) != dense_parameter_count(spec):
        raise RuntimeError(
            f"{library}: the dense optimizer holds {len(dense)} parameters; the MLPs have "
            f"{dense_parameter_count(spec)} (weights and biases): the embedding tables must not be in it."
        )
    return dmp, optimizer, info


def train_step(dmp, optimizer, dense, kjt, labels) -> Tuple[torch.Tensor, float, float, float]:
    """The timed step: ``(loss, forward s, backward s, optimizer s)``. The
    optimizer part includes dist_rec's ``dmp.sync()`` (its API asks for it
    after every optimizer step; with one replica and row-wise AdaGrad it does
    nothing); TorchRec's DMP has none (only its 2D ``DMPCollection``)."""
    t0 = time.perf_counter()
    logits = dmp(dense, kjt)
    loss = F.binary_cross_entropy_with_logits(logits.squeeze(1), labels)
    t1 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    sync = getattr(dmp, "sync", None)
    if sync is not None:
        sync()
    t3 = time.perf_counter()
    return loss.detach(), t1 - t0, t2 - t1, t3 - t2


def _dist_rec_loss(model, batch) -> torch.Tensor:
    logits = model(batch.dense_features, batch.sparse_features)
    return F.binary_cross_entropy_with_logits(logits.squeeze(1), batch.labels)


def pipelined(library: str, dmp, optimizer, batches: List[dict]):
    """``(pipeline, batch objects)``: each library's own train pipeline,
    which starts the next batch's input dist during the current step
    (dist_rec: ``dist_rec.sharding.pipeline.TrainPipelineSparseDist``; TorchRec:
    ``torchrec.distributed.train_pipeline.TrainPipelineSparseDist``, whose
    step is zero_grad, forward, backward, dense optimizer step, like
    ``train_step``), and the batches in the form it takes."""
    if library == "torchrec":
        import _torchrec_dmp
        from torchrec.datasets.utils import Batch

        objects = [Batch(b["dense"], to_kjt(library, b), b["labels"]) for b in batches]
        return _torchrec_dmp.train_pipeline(dmp, optimizer), objects
    from dist_rec.data.batch import Batch
    from dist_rec.sharding.pipeline import TrainPipelineSparseDist

    objects = [Batch(b["dense"], to_kjt(library, b), b["labels"]) for b in batches]
    return TrainPipelineSparseDist(dmp, optimizer, _dist_rec_loss), objects


def pipeline_loss(library: str, output) -> torch.Tensor:
    """The loss of a ``progress`` call (TorchRec's returns ``(loss, logits)``)."""
    return output[0] if library == "torchrec" else output


def quiet() -> None:
    """TorchRec's planner and deprecation warnings, once per process, are noise here."""
    warnings.filterwarnings("ignore")
    for name in ("torchrec", "torch.fx._symbolic_trace", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------


def rank_time(rank: int, world_size: int, variant: str, spec: dict, data: str, steps: int, warmup: int,
              threads: int, loop: str = "plain") -> dict:  # fmt: skip
    """One rank of a timed run: its times, losses and memory. A pipelined
    step is one ``progress`` call (no phases)."""
    import torch.distributed as dist

    quiet()
    torch.set_num_threads(threads)
    library, sharding_type = split_variant(variant)
    batches = torch.load(Path(data) / f"rank{rank}.pt")
    t0 = time.perf_counter()
    dmp, optimizer, info = build_sharded(library, sharding_type, spec, batches[0]["keys"], loop)
    if loop == "pipeline":
        pipeline, objects = pipelined(library, dmp, optimizer, batches)
        # One batch more than steps: the last timed step also has a next batch to send.
        feed = iter([objects[i % len(objects)] for i in range(warmup + steps + 1)])
    else:
        inputs = [(b["dense"], to_kjt(library, b), b["labels"]) for b in batches]
    build_s = time.perf_counter() - t0

    dist.barrier()
    step_ms, phases, losses = [], {"forward": [], "backward": [], "optimizer": []}, []
    usage = None
    for i in range(warmup + steps):
        if i == warmup:
            usage = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        if loop == "pipeline":
            loss, split = pipeline_loss(library, pipeline.progress(feed)), None
        else:
            loss, *split = train_step(dmp, optimizer, *inputs[i % len(inputs)])
        t1 = time.perf_counter()
        losses.append(float(loss))
        if i >= warmup:
            step_ms.append((t1 - t0) * 1e3)
            for key, seconds in zip(phases, split or ()):
                phases[key].append(seconds * 1e3)
    after = resource.getrusage(resource.RUSAGE_SELF)
    dist.barrier()
    return dict(
        rank=rank,
        step_ms=statistics.median(step_ms),
        # Page faults and system time (the kernel's: faults, unmaps, socket calls) per timed step.
        faults_per_step=(after.ru_minflt - usage.ru_minflt) / steps,
        system_ms_per_step=(after.ru_stime - usage.ru_stime) / steps * 1e3,
        phases_ms={k: statistics.median(v) for k, v in phases.items() if v},
        first_losses=losses[:5],
        last_loss=losses[-1],
        build_s=build_s,
        threads=torch.get_num_threads(),
        max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        info=info if rank == 0 else {},
    )


def _dense_state(model) -> Dict[str, torch.Tensor]:
    """The MLP weights under names shared by both libraries' DLRMs
    (``_linear_state``; wrappers such as DMP, DDP or ``TrainModule``
    looked through)."""
    out = {}
    for name, module in model.named_modules():
        arch = name.rsplit(".", 1)[-1]
        if arch in ("dense_arch", "over_arch"):
            out.update({k: v.detach().clone() for k, v in _linear_state(module, arch).items()})
    return out


def _gather_dist_rec_tables(dmp) -> Optional[Dict[str, torch.Tensor]]:
    """dist_rec's tables in full on every rank (``gather_unsharded()`` of its
    sharded collections, a collective), or None if the API lacks it."""
    modules = getattr(dmp, "sharded_modules", lambda: [])()
    if not modules or not all(hasattr(m, "gather_unsharded") for m in modules):
        return None
    out = {}
    for module in modules:
        state, _ = module.gather_unsharded()
        out.update({key.split(".")[-2]: w for key, w in state.items()})
    return out


def check_label(library: str, loop: str) -> str:
    return library if loop == "plain" else f"{library}+pipeline"


def rank_check(rank: int, world_size: int, libraries: List[str], sharding_type: str, spec: dict, data: str,
               steps: int, threads: int, loops: Tuple[str, ...] = ("plain",)) -> Optional[dict]:  # fmt: skip
    """Trains each library's sharded model (with each loop) and, on rank 0,
    the unsharded reference on the global batches; rank 0 returns the
    losses and weight differences."""
    import torch.distributed as dist

    from bench_train import build as build_unsharded

    quiet()
    torch.set_num_threads(threads)
    batches = torch.load(Path(data) / f"rank{rank}.pt")
    keys = batches[0]["keys"]
    out: Dict[str, dict] = {"losses": {}, "weight_diff": {}}
    trained = {}
    for library, loop in [(lib, loop) for loop in loops for lib in libraries]:
        dmp, optimizer, _ = build_sharded(library, sharding_type, spec, keys, loop)
        if loop == "pipeline":
            pipeline, objects = pipelined(library, dmp, optimizer, batches)
            feed = iter([objects[i % len(objects)] for i in range(steps)])
            step = lambda i: pipeline_loss(library, pipeline.progress(feed))  # noqa: E731
        else:
            inputs = [(b["dense"], to_kjt(library, b), b["labels"]) for b in batches]
            step = lambda i: train_step(dmp, optimizer, *inputs[i % len(inputs)])[0]  # noqa: E731
        losses = []
        for i in range(steps):
            loss = step(i).clone()
            dist.all_reduce(loss)  # the processes' mean losses -> the global batch's mean loss
            losses.append(float(loss) / world_size)
        tables = (
            __import__("_torchrec_dmp").gather_tables(dmp) if library == "torchrec" else _gather_dist_rec_tables(dmp)
        )
        label = check_label(library, loop)
        trained[label] = (_dense_state(dmp), tables if rank == 0 else None)
        out["losses"][label] = losses
        del dmp, optimizer, step
    if rank == 0:
        global_batches = torch.load(Path(data) / "global.pt")
        model, optimizer, _ = build_unsharded("torchrec", spec, keys)
        inputs = [(b["dense"], to_kjt("torchrec", b), b["labels"]) for b in global_batches]
        losses = []
        for i in range(steps):
            dense, kjt, labels = inputs[i % len(inputs)]
            loss = F.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(1), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        out["losses"]["reference"] = losses
        reference = model.state_dict()
        reference_dense = _dense_state(model)
        for library, (dense_state, tables) in trained.items():
            if dense_state.keys() != reference_dense.keys():
                raise RuntimeError(f"{library}: MLP weights {sorted(dense_state)} != {sorted(reference_dense)}")
            diff = {"dense": max(float((v - reference_dense[k]).abs().max()) for k, v in dense_state.items())}
            if tables is not None:
                diff["embedding"] = max(
                    float((w - reference[f"sparse_arch.embedding_bags.{t}.weight"]).abs().max())
                    for t, w in tables.items()
                )
            out["weight_diff"][library] = diff
    dist.barrier()
    return out if rank == 0 else None


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run_variant(variant: str, world_size: int, spec: dict, data: Path, args, loop: str = "plain") -> dict:
    ranks = run_ranks(
        rank_time, world_size, args.timeout, label=f"rank_time ({variant})", variant=variant, spec=spec,
        data=str(data), steps=args.steps, warmup=args.warmup,
        threads=args.threads or default_threads(world_size), loop=loop, pin=args.pin,
        keep_freed_memory=args.keep_freed_memory,
    )  # fmt: skip
    slowest = max(ranks, key=lambda r: r["step_ms"])
    return dict(
        step_ms=slowest["step_ms"],
        rank_step_ms=[r["step_ms"] for r in ranks],
        phases_ms=slowest["phases_ms"],
        examples_per_s=world_size * spec["batch"] / slowest["step_ms"] * 1e3,
        first_losses=ranks[0]["first_losses"],
        last_loss=ranks[0]["last_loss"],
        build_s=max(r["build_s"] for r in ranks),
        threads=ranks[0]["threads"],
        max_rss_mb=max(r["max_rss_mb"] for r in ranks),
        rank_faults_per_step=[r["faults_per_step"] for r in ranks],
        rank_system_ms_per_step=[r["system_ms_per_step"] for r in ranks],
        info=ranks[0]["info"],
    )


def check(world_size: int, sharding_type: str, libraries: List[str], spec: dict, data: Path, args) -> dict:
    """The correctness pass of one sharding type (every loop); exits if a
    library does not train as one step on the global batch."""
    out = run_ranks(
        rank_check, world_size, args.timeout, label=f"rank_check ({sharding_type})", libraries=libraries,
        sharding_type=sharding_type, spec=spec, data=str(data), steps=args.check_steps,
        threads=args.threads or default_threads(world_size), loops=tuple(args.loop),
    )[0]  # fmt: skip
    reference = out["losses"]["reference"]
    print(
        f"  check {sharding_type}: mean loss over the {world_size} processes vs one process on the global batch",
        flush=True,
    )
    print("    reference   " + " ".join(f"{x:.6f}" for x in reference), flush=True)
    failures = []
    out["max_loss_diff"] = {}
    for library in [check_label(lib, loop) for loop in args.loop for lib in libraries]:
        losses = out["losses"][library]
        diff = max(abs(a - b) for a, b in zip(losses, reference))
        out["max_loss_diff"][library] = diff
        weights = out["weight_diff"][library]
        weight_text = ", ".join(f"{k} {v:.1e}" for k, v in weights.items())
        losses_text = " ".join(f"{x:.6f}" for x in losses)
        print(
            f"    {library:<11} {losses_text}   max |loss diff| {diff:.1e}; max |weight diff| {weight_text}", flush=True
        )
        weight_tolerance = max(args.weight_tolerance, spec.get("weight_tolerance", 0.0))
        if not diff <= args.loss_tolerance or not all(v <= weight_tolerance for v in weights.values()):
            failures.append(f"{library} (loss diff {diff:.2e}, weight diff {weights})")
    if failures:
        raise SystemExit(
            f"CORRECTNESS CHECK FAILED for {spec['preset']} on {world_size} processes, {sharding_type}: "
            f"{'; '.join(failures)} differ from one step on the global batch (tolerances: loss "
            f"{args.loss_tolerance:g}, weights {max(args.weight_tolerance, spec.get('weight_tolerance', 0.0)):g})."
        )
    return out


def bench_preset(name: str, world_size: int, args, started: float) -> List[dict]:
    spec = resolve_preset(name, args.max_rows)
    spec["torchrec_model"] = args.torchrec_model
    print(f"== {describe(spec)} per process, {world_size} processes, TorchRec trains {args.torchrec_model}'s DLRM",
          flush=True)  # fmt: skip
    shardings = [s for s in SHARDINGS.values() if any(split_variant(v)[1] == s for v in args.variants)]
    rows = {
        (s, loop): dict(preset=name, label=describe(spec), spec=spec, world_size=world_size, sharding_type=s, loop=loop)
        for s in shardings
        for loop in args.loop
    }
    runs = [(v, loop) for loop in args.loop for v in args.variants]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        t0 = time.time()
        for rank in range(world_size):
            torch.save(make_batches(spec, args.batches, spec["batch"], rank, world_size), data / f"rank{rank}.pt")
        if not args.skip_check:
            # The ranks cycle through their batches: so does the reference.
            count = min(args.check_steps, args.batches)
            torch.save(make_batches(spec, count, spec["batch"] * world_size), data / "global.pt")
        print(f"  data: {args.batches} batches per process ({time.time() - t0:.0f}s)", flush=True)
        if not args.skip_check:
            for s in shardings:
                libraries = [lib for lib in LIBRARIES if any(split_variant(v) == (lib, s) for v in args.variants)]
                rows[(s, args.loop[0])]["check"] = check(world_size, s, libraries, spec, data, args)

        def measure(run: Tuple[str, str], r: int) -> dict:
            variant, loop = run
            result = run_variant(variant, world_size, spec, data, args, loop)
            if not all(map(math.isfinite, [*result["first_losses"], result["last_loss"]])):
                print(f"  warning: {variant} trained to a non-finite loss; timings may be off", flush=True)
            phases = result["phases_ms"]
            split = (
                f"; fwd {phases['forward']:.1f} bwd {phases['backward']:.1f} opt {phases['optimizer']:.1f}"
                if phases
                else ""
            )
            print(
                f"[{name} x{world_size} round {r + 1}/{args.rounds} {time.time() - started:5.0f}s] {variant:<12} "
                f"{loop:<8} step {result['step_ms']:8.2f} ms (ranks "
                f"{', '.join(f'{x:.1f}' for x in result['rank_step_ms'])}{split})  "
                f"{result['examples_per_s']:9.0f} ex/s  rss {result['max_rss_mb']:.0f} MB  page faults/step "
                f"{', '.join(f'{x:.0f}' for x in result['rank_faults_per_step'])}  sys ms/step "
                f"{', '.join(f'{x:.1f}' for x in result['rank_system_ms_per_step'])}",
                flush=True,
            )
            return result

        rounds = run_rounds(runs, args.rounds, measure)
    for (variant, loop), results in rounds.items():
        library, s = split_variant(variant)
        step_ms = statistics.median(x["step_ms"] for x in results)
        rows[(s, loop)][library] = dict(
            step_ms=step_ms,
            examples_per_s=world_size * spec["batch"] / step_ms * 1e3,
            phases_ms=median_fields([x["phases_ms"] for x in results]),
            # The highest of any process, medians over rounds.
            faults_per_step=statistics.median(max(x["rank_faults_per_step"]) for x in results),
            system_ms_per_step=statistics.median(max(x["rank_system_ms_per_step"]) for x in results),
            rounds=results,
        )
    for row in rows.values():
        if "dist_rec" in row and "torchrec" in row:
            row["ratios"] = per_round_ratios(row["torchrec"]["rounds"], row["dist_rec"]["rounds"])
    return list(rows.values())


def format_table(rows: List[dict]) -> str:
    header = [
        "preset", "processes", "sharding", "train loop", "dist_rec step ms", "TorchRec step ms", "dist_rec ex/s",
        "TorchRec ex/s", "speedup vs TorchRec (median of rounds; min-max)",
    ]  # fmt: skip
    lines = []
    for r in rows:
        cells = [r["preset"], str(r["world_size"]), r["sharding_type"], r.get("loop", "plain")]
        cells += [f"{r[lib]['step_ms']:.1f}" if lib in r else "-" for lib in LIBRARIES]
        cells += [f"{r[lib]['examples_per_s']:,.0f}" if lib in r else "-" for lib in LIBRARIES]
        cells.append(ratio_cell(r.get("ratios")))
        lines.append(cells)
    return markdown_table(header, lines)


def format_phases(rows: List[dict]) -> str:
    header = ["preset", "processes", "sharding", "phase", "dist_rec ms", "TorchRec ms"]
    lines = []
    for r in rows:
        if r.get("loop", "plain") != "plain":
            continue  # a pipelined step overlaps the phases
        for phase in ("forward", "backward", "optimizer"):
            cells = [r["preset"], str(r["world_size"]), r["sharding_type"], phase]
            cells += [f"{r[lib]['phases_ms'][phase]:.1f}" if lib in r else "-" for lib in LIBRARIES]
            lines.append(cells)
        for label, key, digits in (
            ("(minor page faults / step)", "faults_per_step", 0), ("(system ms / step)", "system_ms_per_step", 1),
        ):
            cells = [r["preset"], str(r["world_size"]), r["sharding_type"], label]
            cells += [f"{r[lib][key]:,.{digits}f}" if lib in r else "-" for lib in LIBRARIES]
            lines.append(cells)
    return markdown_table(header, lines)


def write_markdown(
    path: Path, table: str, phases: str, command: str, args, rows: List[dict], load: List[float]
) -> None:
    checks = "; ".join(
        f"{r['preset']} x{r['world_size']} {r['sharding_type']}: "
        + ", ".join(
            f"{lib} loss {d:.1e}" + "".join(f", {k} {v:.1e}" for k, v in r["check"]["weight_diff"][lib].items())
            for lib, d in r["check"]["max_loss_diff"].items()
        )
        for r in rows
        if "check" in r
    )
    presets = "; ".join(sorted({r["label"] for r in rows}))
    threads = args.threads or "cores / processes"
    pinned = ("; every library's processes pinned to their own block of the cores (`--pin`, as dist_rec's "
              "trainer pins a torchrun process: `train.pin_cores`)") if args.pin else ""  # fmt: skip
    if args.keep_freed_memory:
        pinned += ("; every library's processes keep the memory a step frees (`--keep-freed-memory`: glibc "
                   "malloc set up as dist_rec's trainer sets it, `train.keep_freed_memory`)")  # fmt: skip
    text = f"""## Sharded DLRM training, end to end (CPU, gloo processes)

Machine: {machine_summary(torchrec=True)}; threads per process: {threads}{pinned}.{busy_note(load)}

Command: `{command}` ({datetime.date.today().isoformat()}).

Workloads (B is per process; the global batch is processes x B): {presets}.

`W` processes on one host (gloo over loopback) train one DLRM: each its own
batch, tables sharded over the processes (all table-wise, or all row-wise),
MLPs replicated under DDP. Each library trains its own DLRM implementation
of the same model (TorchRec: `torchrec.models.dlrm.DLRM`, its MLP weights
copied from dist_rec's initial ones; `--torchrec-model dist_rec` puts
`dist_rec.models.DLRM` on both sides instead, to compare the embedding and
sharding stacks alone). dist_rec:
`dist_rec.sharding.DistributedModelParallel(model, sharding_type=...)` over
its `EmbeddingBagCollection` with the fused `RowWiseAdagrad`; its sharding
all-to-alls between processes of one host go through shared memory
(`dist_rec.distributed.shm_transport`, its default; TorchRec's go through
gloo, and DDP's all-reduce is gloo on both sides). TorchRec:
`torchrec.distributed.DistributedModelParallel` over its DLRM holding a
`torchrec.EmbeddingBagCollection` (meta device), tables under
`apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad)` (FBGEMM TBE,
`EXACT_ROWWISE_ADAGRAD`, fused into the backward), plan from
`EmbeddingShardingPlanner` (CPU topology, `ParameterConstraints` fixing the
sharding type), `EmbeddingBagCollectionSharder` (TorchRec 1.8.0 offers
row-wise only for CUDA; a subclass lifting that filter runs it on the CPU),
dense `Adagrad` via `KeyedOptimizerWrapper` (under dist_rec's DLRM, its
table-wise output, grouped by rank, is first put back in feature order, as
TorchRec's own DLRM does with `to_dict`). Same initial weights, lr/eps,
data. A timed step is forward, BCE loss, `zero_grad`, backward (DDP
all-reduce, embedding gradients to their shards, fused update) and the dense
optimizer step; {args.warmup} warm-up + {args.steps} timed steps per run, a
run's time is the slowest process's median step; every run is a fresh set of
processes, variants alternating for {args.rounds} rounds; step times are
medians over rounds, ex/s is the whole job's (`W x B / step`; per process divide by `W`), the speedup the
median of the per-round ratios TorchRec / dist_rec.

Train loops: `plain` is that step called in a loop; `pipeline` is each
library's own `TrainPipelineSparseDist` (dist_rec's
`dist_rec.sharding.pipeline`, TorchRec's `torchrec.distributed.train_pipeline`
on the CPU, the same DLRM and loss behind its `model(batch) -> (loss, output)`
interface), which sends the next batch's ids while the current batch trains;
a pipelined step is one `progress` call (its phases overlap, so it has no
row in the phase table).

Correctness pass before timing (each library's sharded model, with every
loop, against one process trained on the global batches, {args.check_steps}
steps; max differences of the mean loss and of the weights): {checks or "skipped"}.

{table}

Where a step's time goes (slowest process, medians over rounds; minor
page faults and system time, the kernel's share of a step, the highest of
any process):

{phases}
"""
    update_section(path, "sharded", text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["default"])
    parser.add_argument("--world", nargs="+", type=int, default=[2], help="numbers of processes")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument(
        "--loop", nargs="+", choices=LOOPS, default=list(LOOPS),
        help="plain: forward, backward, step; pipeline: each library's TrainPipelineSparseDist",
    )  # fmt: skip
    parser.add_argument(
        "--torchrec-model", choices=("torchrec", "dist_rec"), default="torchrec",
        help="the DLRM TorchRec trains: torchrec.models.dlrm.DLRM (its users' model) or dist_rec's (same dense code "
        "on both sides: compares the embedding and sharding stacks alone)",
    )  # fmt: skip
    parser.add_argument("--max-rows", type=int, default=None, help="cap every table at this many rows (memory)")
    parser.add_argument(
        "--batches", type=int, default=16, help="pre-generated batches per process the steps cycle through"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="turns each variant takes")
    parser.add_argument("--threads", type=int, default=None, help="threads per process (default: cores / processes)")
    parser.add_argument("--pin", action="store_true",
                        help="pin every library's processes to their own block of the cores, as dist_rec's trainer "
                             "pins a torchrun process (train.pin_cores)")  # fmt: skip
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="every library's processes keep the memory a step frees (glibc malloc set up as "
                             "dist_rec's trainer sets it: train.keep_freed_memory)")  # fmt: skip
    parser.add_argument("--check-steps", type=int, default=4, help="steps of the correctness pass")
    parser.add_argument("--loss-tolerance", type=float, default=1e-4)
    parser.add_argument("--weight-tolerance", type=float, default=1e-3)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one multi-process run may take")
    parser.add_argument("--markdown", type=Path, help="rewrite the sharded section of this page")
    parser.add_argument("--json", type=Path, help="write all measurements as JSON")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.steps < 1 or args.rounds < 1 or args.check_steps < 1:
        parser.error("--batches, --steps, --rounds and --check-steps must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0; it is {args.warmup}")
    if any(w < 1 for w in args.world):
        parser.error("--world: numbers of processes must be >= 1")
    if any(v.startswith("dist_rec") for v in args.variants):
        api, why = dist_rec_sharding_api()
        if api is None:
            parser.error(
                f"the dist_rec variants need dist_rec.sharding.DistributedModelParallel, which this checkout lacks "
                f"({why}); run the TorchRec side alone with --variants torchrec_tw torchrec_rw"
            )

    load = warn_if_busy()
    started = time.time()
    rows = [row for name in args.preset for world in args.world for row in bench_preset(name, world, args, started)]
    bench_train.report("bench_sharded.py", argv, args, rows, load, format_table, format_phases, write_markdown)


if __name__ == "__main__":
    main()
