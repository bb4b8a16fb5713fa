"""Train DLRM on one process or many: ``python -m dist_rec.train``.

Under ``torchrun`` (or any launcher that sets RANK/WORLD_SIZE) the processes
form a group (NCCL with GPUs, gloo on CPU). Dense layers are data-parallel
through DDP; embedding tables are data-parallel too, with the optimizer
fused into the backward and updates agreed from the global batch
(``dist_rec.sharding.dp_sharding``), so N processes with batch B train as
one with batch N x B. With ``train.dense_engine=deepspeed`` DeepSpeed ZeRO
(stage 1 or 2) owns the dense layers instead of DDP, with the same numbers
(``dist_rec.engines.deepspeed_engine``).

    python -m dist_rec.train --config launch/configs/default.yaml train.steps=500
    torchrun --nproc-per-node 2 -m dist_rec.train --config launch/configs/default.yaml

Rank 0 prints a progress line every ``train.log_every`` steps and a summary
at the end; ``train.output_dir`` receives ``metrics.jsonl`` (one JSON record
per log line and per evaluation), ``training.png`` (training loss and
evaluation AUC over steps), ``summary.json`` and the resolved ``config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dist_rec.config import ConfigError, TrainConfig, load_config
from dist_rec.data.batch import Batch, Dataset
from dist_rec.metrics import EvalMetrics, binary_metrics, gather_predictions
from dist_rec.models.dlrm import DLRM, DLRM_DCN
from dist_rec.modules.embedding_configs import EmbeddingBagConfig
from dist_rec.modules.embedding_modules import EmbeddingBagCollection
from dist_rec.sparse.jagged_tensor import KeyedJaggedTensor
from dist_rec.optim.fused import SGD, FusedOptimizer, MomentumScaledRowWiseAdagrad, RowWiseAdagrad
from dist_rec.optim.shampoo import DDPShampooConfig, DistributedShampoo
from dist_rec.checkpoint import load_checkpoint, save_checkpoint
from dist_rec.sharding.model_parallel import DistributedModelParallel
from dist_rec.sharding.plan import ShardingPlan


@dataclass
class Environment:
    """Where this process runs: its rank, the group, the device."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    backend: Optional[str] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_environment(config: TrainConfig) -> Environment:
    """Joins the process group when launched by torchrun; picks the device,
    the backend and the thread count."""
    run = config.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    use_cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("Invalid train.device='cuda'. Must be 'cpu' or 'auto' on a machine without a GPU.")
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = run.backend if run.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("Invalid train.backend='nccl'. Must be 'gloo' or 'auto' when training on the CPU.")
    threads = run.threads or max(1, (os.cpu_count() or 1) // max(local_world_size, 1))
    torch.set_num_threads(threads)
    env = Environment(rank, world_size, local_world_size, backend if world_size > 1 else None, device)
    if env.distributed and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return env


# -- data -------------------------------------------------------------------


@dataclass
class Data:
    train: Dataset
    eval: Optional[Dataset]
    sparse_feature_names: List[str]
    num_embeddings_per_feature: List[int]
    num_dense_features: int
    teacher_auc: Optional[float] = None


def build_data(config: TrainConfig) -> Data:
    data = config.data
    if data.source == "synthetic":
        from dist_rec.data.synthetic import SyntheticDataset

        synthetic = data.synthetic_config()
        train = SyntheticDataset(synthetic, "train")
        evaluation = SyntheticDataset(synthetic, "eval", num_samples=data.eval_samples)
        return Data(train, evaluation, train.sparse_feature_names, synthetic.num_embeddings_per_feature, data.num_dense_features)
    sizes = list(data.num_embeddings_per_feature)
    if len(sizes) == 1:
        sizes = sizes * 26
    if data.source == "criteo_text":
        from dist_rec.data.criteo import CriteoTextDataset

        train = CriteoTextDataset(data.train_paths, sizes, on_error=data.on_error)
        evaluation = CriteoTextDataset(data.eval_paths, sizes, on_error=data.on_error) if data.eval_paths else None
    else:
        from dist_rec.data.binary import BinaryDataset

        if len(data.train_paths) != 1 or len(data.eval_paths) > 1:
            raise ConfigError(
                f"Invalid data.train_paths={data.train_paths!r}. Must be one directory (and data.eval_paths at most "
                "one) for source='criteo_binary'."
            )
        train = BinaryDataset(data.train_paths[0])
        evaluation = BinaryDataset(data.eval_paths[0]) if data.eval_paths else None
        stored = list(getattr(train, "num_embeddings_per_feature", sizes))
        if stored != sizes:
            raise ConfigError(
                f"Invalid data.num_embeddings_per_feature={data.num_embeddings_per_feature}. Must match the sizes the "
                f"binary dataset {data.train_paths[0]} was hashed with: {stored}."
            )
    return Data(train, evaluation, train.sparse_feature_names, sizes, train.num_dense_features)


# -- model ------------------------------------------------------------------


def sparse_optimizer(config: TrainConfig) -> FusedOptimizer:
    o = config.optimizer
    common = dict(lr=o.sparse_lr, weight_decay=o.sparse_weight_decay, weight_decay_mode=o.sparse_weight_decay_mode)
    if o.sparse == "sgd":
        return SGD(**common)
    if o.sparse == "rowwise_adagrad":
        return RowWiseAdagrad(eps=o.sparse_eps, **common)
    return MomentumScaledRowWiseAdagrad(eps=o.sparse_eps, momentum_scale=o.sparse_momentum_scale, **common)


def dense_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    o = config.optimizer
    if o.dense == "sgd":
        return torch.optim.SGD(parameters, lr=o.dense_lr)
    if o.dense == "adagrad":
        return torch.optim.Adagrad(parameters, lr=o.dense_lr)
    if o.dense == "shampoo":
        s = o.shampoo
        spread = s.distributed and dist.is_initialized() and dist.get_world_size() > 1
        dtype = getattr(torch, s.communication_dtype) if s.communication_dtype else None
        distributed = DDPShampooConfig(communication_dtype=dtype) if spread else None
        return DistributedShampoo(parameters, lr=o.dense_lr, distributed_config=distributed, **s.optimizer_kwargs())
    return torch.optim.Adam(parameters, lr=o.dense_lr)


def build_model(config: TrainConfig, data: Data, device: torch.device) -> DLRM:
    tables = [
        EmbeddingBagConfig(
            name=f"t_{name}", embedding_dim=config.model.embedding_dim, num_embeddings=rows, feature_names=[name]
        )
        for name, rows in zip(data.sparse_feature_names, data.num_embeddings_per_feature)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=device, optimizer=sparse_optimizer(config))
    shape = dict(
        dense_in_features=data.num_dense_features,
        dense_arch_layer_sizes=config.model.dense_arch_layer_sizes,
        over_arch_layer_sizes=config.model.over_arch_layer_sizes,
    )
    if config.model.interaction == "dcn":
        model = DLRM_DCN(ebc, **shape, dcn_num_layers=config.model.dcn_num_layers, dcn_low_rank=config.model.dcn_low_rank)
    else:
        model = DLRM(ebc, **shape)
    return model.to(device)


# -- the loop ---------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl on rank 0; every record is also kept for the plot."""

    def __init__(self, path: Optional[Path]) -> None:
        self.records: List[Dict] = []
        self._file = open(path, "w") if path is not None else None

    def write(self, record: Dict) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class TrainResult:
    steps: int
    examples: int
    train_seconds: float
    examples_per_second: float
    final_eval: Optional[EvalMetrics]
    teacher_auc: Optional[float]
    losses: List[float]
    output_dir: Optional[Path]
    model: Optional[nn.Module] = None
    dense_engine: Optional[object] = None  # the DeepSpeedDenseEngine with train.dense_engine=deepspeed


def shard_model(model: DLRM, config: TrainConfig, env: Environment) -> DistributedModelParallel:
    """The model with its tables spread as ``config.sharding`` says and its
    dense layers under DDP (left bare for another dense engine)."""
    s = config.sharding
    plan = ShardingPlan.load(s.plan) if s.plan else None
    sharding_type = None if plan is not None or s.type == "auto" else s.type
    if plan is not None:
        plan = {"sparse_arch": plan}
    return DistributedModelParallel(
        model,
        plan=plan,
        sharding_type=sharding_type,
        replicas=s.replicas,
        sync_every=s.sync_every,
        layout=s.layout,
        memory_per_rank=s.memory_per_rank_mb << 20 if s.memory_per_rank_mb else None,
        device=env.device,
        wrap_dense=config.train.dense_engine == "ddp",
    )


def _save(directory: Path, sharded: DistributedModelParallel, optimizer, step: int, global_batch: int, say) -> None:
    tick = time.perf_counter()
    save_checkpoint(directory, sharded, optimizer, step=step, extra={"examples": step * global_batch})
    say(f"checkpoint @ step {step}: {directory} ({time.perf_counter() - tick:.1f} s)")


def _resume(directory: Path, sharded: DistributedModelParallel, optimizer, global_batch: int, batches, say) -> int:
    """Loads the checkpoint (resharding as needed) and moves the data stream
    past the examples it had seen. Returns the step to continue from."""
    info = load_checkpoint(directory, sharded, optimizer)
    examples = int(info["extra"].get("examples", 0)) if isinstance(info["extra"], dict) else 0
    if examples % global_batch != 0:
        raise ConfigError(
            f"The checkpoint in {directory} stopped after {examples} examples, not a multiple of this run's global "
            f"batch {global_batch}; resume with a global batch that divides it."
        )
    for _ in range(examples // global_batch):  # the stream is deterministic: regenerate and drop
        next(batches, None)
    step = examples // global_batch
    say(f"resumed from {directory}: step {info['step']}, {examples:,} examples seen; continuing at step {step}")
    return step


def _all_have_batch(has_batch: bool, env: Environment) -> bool:
    """Streams of unknown length can end at different steps on different
    ranks; every rank stops at the first step any of them cannot fill."""
    if not env.distributed:
        return has_batch
    flag = torch.tensor([int(has_batch)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _any_has_batch(has_batch: bool) -> bool:
    flag = torch.tensor([int(has_batch)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _empty_batch(like: Batch) -> Batch:
    """A batch of no samples with ``like``'s features and dtypes."""
    kjt = like.sparse_features
    empty = KeyedJaggedTensor(
        list(kjt.keys()), kjt.values()[:0], lengths=kjt.lengths()[:0],
        weights=kjt.weights_or_none()[:0] if kjt.weights_or_none() is not None else None,
    )
    return Batch(like.dense_features[:0], empty, like.labels[:0])


def evaluate(model: nn.Module, dataset: Dataset, config: TrainConfig, env: Environment) -> EvalMetrics:
    """Exact metrics over the whole evaluation set of all ranks."""
    was_training = model.training
    model.eval()
    probabilities, labels = [], []
    batch_size = config.train.eval_batch_size
    batches = dataset.batches(batch_size, env.rank, env.world_size, drop_last=False)
    template = None
    with torch.no_grad():
        while True:
            batch = next(batches, None)
            # A sharded forward is a collective: ranks whose share has run out
            # (or never began: fewer batches than ranks) feed empty batches
            # until every rank's has.
            if env.distributed and not _any_has_batch(batch is not None):
                break
            if batch is None:
                if not env.distributed:
                    break
                if template is None:  # shaped like the set's first batch
                    template = next(dataset.batches(batch_size, 0, 1, drop_last=False))
                batch = _empty_batch(template)
            template = batch
            batch = batch.to(env.device)
            logits = model(batch.dense_features, batch.sparse_features).reshape(-1)
            probabilities.append(torch.sigmoid(logits).cpu())
            labels.append(batch.labels.cpu())
    model.train(was_training)
    local_p = torch.cat(probabilities) if probabilities else torch.zeros(0)
    local_y = torch.cat(labels) if labels else torch.zeros(0)
    all_p, all_y = gather_predictions(local_p, local_y)
    return binary_metrics(all_p, all_y)


def train(config: TrainConfig, env: Optional[Environment] = None, quiet: bool = False) -> TrainResult:
    """Runs the training described by ``config`` in this process (one rank
    of the group when distributed). Returns what rank 0 reports."""
    env = env or setup_environment(config)
    run = config.train
    if run.dense_engine == "deepspeed":
        config.check_deepspeed()
        if not env.distributed:
            raise ConfigError(
                "Invalid train.dense_engine='deepspeed'. Must be 'ddp' for a single process (DeepSpeed ZeRO partitions "
                "the dense optimizer over 2 or more processes: launch with torchrun)."
            )
    say = (lambda *a: print(*a, flush=True)) if env.is_main and not quiet else (lambda *a: None)
    output_dir = Path(run.output_dir) if run.output_dir else None
    if env.is_main and output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config.to_yaml())
    log = MetricsLog(output_dir / "metrics.jsonl" if env.is_main and output_dir is not None else None)

    data = build_data(config)
    if env.is_main and data.eval is not None and hasattr(data.eval, "teacher_auc"):
        data.teacher_auc = data.eval.teacher_auc()
    torch.manual_seed(run.seed)
    model = build_model(config, data, env.device)
    checkpoint_dir = Path(run.checkpoint_dir) if run.checkpoint_dir else None
    own_group = checkpoint_dir is not None and not dist.is_initialized()
    if own_group:  # checkpoints are written by the sharded model: a group of one
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    sharded = shard_model(model, config, env) if dist.is_initialized() else None
    trained = sharded if sharded is not None else model
    model = sharded.unwrapped if sharded is not None else model
    optimizer = dense_optimizer(config, [p for p in trained.parameters() if p.requires_grad])
    engine = None
    if run.dense_engine == "deepspeed":
        from dist_rec.engines.deepspeed_engine import DeepSpeedDenseEngine

        engine = DeepSpeedDenseEngine(sharded, optimizer, run.zero_stage, run.batch_size)
        trained = engine
    fold_increments = isinstance(model.sparse_arch.optimizer, MomentumScaledRowWiseAdagrad)
    loss_fn = nn.BCEWithLogitsLoss()

    global_batch = run.batch_size * env.world_size
    say(
        f"dist_rec: DLRM on {data.train.__class__.__name__}, {env.world_size} process(es) "
        f"({env.backend or 'single'}, {env.device}), batch {run.batch_size} per process ({global_batch} global), "
        f"{len(data.sparse_feature_names)} tables / {sum(data.num_embeddings_per_feature):,} rows x "
        f"{config.model.embedding_dim}, {torch.get_num_threads()} thread(s) per process"
    )
    if engine is not None:
        say(f"dense: {engine.describe()}")
    if sharded is not None:
        say(f"sharding: {sharded.grid}, replicas synchronised every {sharded.sync_every} step(s)")
        say(str(sharded.plans["sparse_arch"]))
    if data.teacher_auc is not None:
        say(f"teacher AUC on the evaluation set (the ceiling): {data.teacher_auc:.4f}")

    batches: Iterator[Batch] = data.train.batches(run.batch_size, env.rank, env.world_size, drop_last=True)
    step = 0
    if checkpoint_dir is not None and (checkpoint_dir / "manifest.json").is_file():
        step = _resume(checkpoint_dir, sharded, optimizer, global_batch, batches, say)
    losses: List[float] = []
    interval_loss, interval_steps, interval_time = 0.0, 0, 0.0
    train_seconds, final_eval = 0.0, None
    first_step = step
    warm_seconds, warm_steps = 0.0, 0  # after the first log interval (warm-up excluded from throughput)
    started = time.perf_counter()
    while run.steps == 0 or step < run.steps:
        tick = time.perf_counter()
        batch = next(batches, None)
        if not _all_have_batch(batch is not None, env):
            break
        batch = batch.to(env.device)
        logits = trained(batch.dense_features, batch.sparse_features).reshape(-1)
        loss = loss_fn(logits, batch.labels)
        if engine is not None:
            engine.backward(loss)  # the tables' all-to-alls and fused updates run in here too
            engine.step()  # and zeroes the dense gradients
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if sharded is not None:
            sharded.sync()  # 2D: agree the replicas every sync_every steps (and fold momentum-scaled increments)
        elif fold_increments:
            model.sparse_arch.sync()  # one process: fold this step's increments in
        step += 1
        elapsed = time.perf_counter() - tick
        train_seconds += elapsed
        interval_time += elapsed
        interval_loss += float(loss.detach())
        interval_steps += 1
        if step > first_step + run.log_every:
            warm_seconds += elapsed
            warm_steps += 1

        if step % run.log_every == 0 or step == run.steps:
            mean_loss = _mean_over_ranks(interval_loss / interval_steps, env)
            rate = interval_steps * global_batch / max(interval_time, 1e-9)
            losses.append(mean_loss)
            log.write(dict(kind="train", step=step, loss=mean_loss, examples_per_second=rate, seconds=time.perf_counter() - started))
            eta = ""
            if run.steps:
                eta = f" | eta {_clock((run.steps - step) * train_seconds / (step - first_step))}"
            say(
                f"step {step:>6}{'/' + str(run.steps) if run.steps else ''} | loss {mean_loss:.4f} | "
                f"{rate:,.0f} ex/s | elapsed {_clock(time.perf_counter() - started)}{eta}"
            )
            interval_loss, interval_steps, interval_time = 0.0, 0, 0.0
        if checkpoint_dir is not None and run.checkpoint_every and step % run.checkpoint_every == 0 and step != run.steps:
            _save(checkpoint_dir, sharded, optimizer, step, global_batch, say)
        if run.eval_every and step % run.eval_every == 0 and data.eval is not None and step != run.steps:
            metrics = evaluate(model, data.eval, config, env)
            log.write(dict(kind="eval", step=step, **metrics.as_dict()))
            say(f"eval @ step {step}: AUC {metrics.auc:.4f} | NE {metrics.ne:.4f} | log loss {metrics.log_loss:.4f}")

    if checkpoint_dir is not None and step > first_step:
        _save(checkpoint_dir, sharded, optimizer, step, global_batch, say)
    if data.eval is not None:
        final_eval = evaluate(model, data.eval, config, env)
        log.write(dict(kind="eval", step=step, **final_eval.as_dict()))
    log.close()
    examples = step * global_batch
    if warm_steps == 0:  # a run shorter than two log intervals: all of it
        warm_seconds, warm_steps = train_seconds, step - first_step
    result = TrainResult(
        steps=step,
        examples=examples,
        train_seconds=train_seconds,
        examples_per_second=warm_steps * global_batch / max(warm_seconds, 1e-9),
        final_eval=final_eval,
        teacher_auc=data.teacher_auc,
        losses=losses,
        output_dir=output_dir,
        model=model,
        dense_engine=engine,
    )
    if env.is_main and output_dir is not None:
        plot_path = plot_training(log.records, data.teacher_auc, output_dir / "training.png")
        summary = _summary(config, env, result, plot_path)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(_summary_table(summary))
    if own_group:
        dist.destroy_process_group()
    return result


def _mean_over_ranks(value: float, env: Environment) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / env.world_size


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def plot_training(records: Sequence[Dict], teacher_auc: Optional[float], path: Path) -> Optional[Path]:
    """Training loss and evaluation AUC over steps, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train_records = [r for r in records if r["kind"] == "train"]
    eval_records = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train_records], [r["loss"] for r in train_records], color="tab:blue")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training log loss (mean over log interval)")
    ax_loss.set_title("Training loss")
    ax_loss.grid(alpha=0.3)
    ax_auc.plot([r["step"] for r in eval_records], [r["auc"] for r in eval_records], "o-", color="tab:green", label="model")
    if teacher_auc is not None:
        ax_auc.axhline(teacher_auc, color="tab:red", linestyle="--", label=f"teacher (ceiling) {teacher_auc:.4f}")
    ax_auc.set_xlabel("step")
    ax_auc.set_ylabel("evaluation AUC")
    ax_auc.set_title("Evaluation AUC")
    ax_auc.grid(alpha=0.3)
    ax_auc.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _summary(config: TrainConfig, env: Environment, result: TrainResult, plot_path: Optional[Path]) -> Dict:
    summary = dict(
        processes=env.world_size,
        backend=env.backend or "none",
        device=str(env.device),
        batch_size_per_process=config.train.batch_size,
        global_batch_size=config.train.batch_size * env.world_size,
        steps=result.steps,
        examples=result.examples,
        train_seconds=round(result.train_seconds, 2),
        examples_per_second=round(result.examples_per_second, 1),
        teacher_auc=result.teacher_auc,
        metrics=str(result.output_dir / "metrics.jsonl") if result.output_dir else None,
        plot=str(plot_path) if plot_path else None,
    )
    if result.final_eval is not None:
        summary["eval"] = result.final_eval.as_dict()
    return summary


def _summary_table(s: Dict) -> str:
    rows = [
        ("processes", f"{s['processes']} ({s['backend']}, {s['device']})"),
        ("global batch", f"{s['global_batch_size']:,} ({s['batch_size_per_process']:,} per process)"),
        ("steps", f"{s['steps']:,} ({s['examples']:,} examples)"),
        ("training time", f"{s['train_seconds']:.1f} s"),
        ("throughput", f"{s['examples_per_second']:,.0f} examples/s (after the first log interval)"),
    ]
    e = s.get("eval")
    if e:
        auc_line = f"{e['auc']:.4f}"
        if s.get("teacher_auc") is not None:
            auc_line += f"  (teacher {s['teacher_auc']:.4f}, gap {s['teacher_auc'] - e['auc']:+.4f})"
        rows += [
            ("eval AUC", auc_line),
            ("eval NE", f"{e['ne']:.4f}"),
            ("eval log loss", f"{e['log_loss']:.4f}"),
            ("eval accuracy", f"{e['accuracy']:.4f} (click rate {e['click_rate']:.4f}, {e['num_samples']:,} samples)"),
        ]
    rows += [("metrics", s["metrics"]), ("plot", s["plot"])]
    width = max(len(k) for k, _ in rows)
    lines = ["", "== dist_rec training summary " + "=" * 40] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (defaults for anything it leaves out)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    env = setup_environment(config)
    try:
        train(config, env)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
