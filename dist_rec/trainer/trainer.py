"""``Trainer``: DLRM training whose loop asks its components when to act.

One step is the pipelined one (``dist_rec.sharding.pipeline``) for every
sharding type: the next batch's ids travel while this batch trains (its
stages are empty where no table is model-parallel). After it the loop asks,
in order, the replica sync, the progress log, the checkpointer and the
evaluator whether to act (each a null object when off; ``components.py``),
then runs the hooks (``TrainerHook``: after every step, after every
checkpoint, on failure).

    trainer = Trainer(config)        # joins the process group, builds data, model, optimizers
    result = trainer.train()         # the loop; rank 0 prints progress and a summary
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dist_rec.config import ConfigError, TrainConfig
from dist_rec.data.batch import Batch
from dist_rec.distributed import destroy_process_group, init_single_process_group
from dist_rec.metrics import EvalMetrics
from dist_rec.optim.fused import MomentumScaledRowWiseAdagrad
from dist_rec.sharding.pipeline import TrainPipelineSparseDist
from dist_rec.trainer.builders import build_data, build_model, dense_optimizer, shard_model
from dist_rec.trainer.components import (
    Checkpointer,
    Evaluator,
    NullCheckpointer,
    NullEvaluator,
    NullReplicaSync,
    ProgressLog,
    ReplicaSync,
    TrainerHook,
)
from dist_rec.trainer.environment import Environment, setup_environment
from dist_rec.trainer.report import MetricsLog, plot_training, summary, summary_table


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


class Trainer:
    """The training described by ``config``, in this process (one rank of
    the job when distributed).

    Args:
        config (TrainConfig): the run.
        env (Optional[Environment]): where it runs (joined from the
            environment, torchrun's, when None).
        quiet (bool): no progress lines or summary on rank 0. (Default: False)
        hooks (Sequence[TrainerHook]): run after every step, after every
            checkpoint and on failure, after the components. (Default: none)

    Attributes a hook may use: ``config``, ``env``, ``model`` (unwrapped),
    ``sharded`` (the ``DistributedModelParallel`` or None),
    ``process_groups``, ``dense_optimizer``, ``checkpointer``,
    ``evaluator``, ``progress``.
    """

    def __init__(
        self, config: TrainConfig, env: Optional[Environment] = None, quiet: bool = False,
        hooks: Sequence[TrainerHook] = (),
    ) -> None:
        self.config = config
        self.env = env = env or setup_environment(config)
        run = config.train
        if run.dense_engine == "deepspeed":
            config.check_deepspeed()
            if not env.distributed:
                raise ConfigError(
                    "Invalid train.dense_engine='deepspeed'. Must be 'ddp' for a single process (DeepSpeed ZeRO "
                    "partitions the dense optimizer over 2 or more processes: launch with torchrun)."
                )
        self.hooks = list(hooks)
        self.say = (lambda *a: print(*a, flush=True)) if env.is_main and not quiet else (lambda *a: None)
        self.output_dir = Path(run.output_dir) if run.output_dir else None
        if env.is_main and self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(config.to_yaml())
        self.log = MetricsLog(self.output_dir / "metrics.jsonl" if env.is_main and self.output_dir is not None else None)

        self.data = build_data(config)
        if env.is_main and self.data.eval is not None and hasattr(self.data.eval, "teacher_auc"):
            self.data.teacher_auc = self.data.eval.teacher_auc()
        torch.manual_seed(run.seed)
        model = build_model(config, self.data, env.device)
        checkpoint_dir = Path(run.checkpoint_dir) if run.checkpoint_dir else None
        self._own_group = checkpoint_dir is not None and not dist.is_initialized()
        if self._own_group:  # checkpoints are written by the sharded model: a group of one
            init_single_process_group()
        self.sharded = shard_model(model, config, env) if dist.is_initialized() else None
        self.process_groups = self.sharded.process_groups if self.sharded is not None else None
        self.model = self.sharded.unwrapped if self.sharded is not None else model
        trained = self.sharded if self.sharded is not None else model
        self.dense_optimizer = dense_optimizer(config, [p for p in trained.parameters() if p.requires_grad])
        self.engine = None
        if run.dense_engine == "deepspeed":
            from dist_rec.engines.deepspeed_engine import DeepSpeedDenseEngine

            self.engine = DeepSpeedDenseEngine(self.sharded, self.dense_optimizer, run.zero_stage, run.batch_size)
            trained = self.engine
        self.global_batch = run.batch_size * env.world_size
        self.pipeline = self._pipeline(trained)

        if self.sharded is not None:
            self.replica_sync = ReplicaSync(self.sharded.sync)
        elif isinstance(self.model.sparse_arch.optimizer, MomentumScaledRowWiseAdagrad):
            self.replica_sync = ReplicaSync(self.model.sparse_arch.sync)  # one process: fold the increments in
        else:
            self.replica_sync = NullReplicaSync()
        self.progress = ProgressLog(self.log, run.log_every, run.steps, self.global_batch, env, self.say)
        self.checkpointer = (
            Checkpointer(checkpoint_dir, run.checkpoint_every, run.steps, self.sharded, self.dense_optimizer, self.global_batch, self.say)
            if checkpoint_dir is not None else NullCheckpointer()
        )
        self.evaluator = (
            Evaluator(self.model, self.data.eval, config, env, run.steps, self.log, self.say)
            if self.data.eval is not None else NullEvaluator()
        )

    def _pipeline(self, trained) -> TrainPipelineSparseDist:
        loss_fn = nn.BCEWithLogitsLoss()

        def loss_of(_, batch: Batch) -> torch.Tensor:
            return loss_fn(trained(batch.dense_features, batch.sparse_features).reshape(-1), batch.labels)

        model = self.sharded if self.sharded is not None else self.model
        if self.engine is not None:  # the engine runs the backward and the dense step (and zeroes the gradients)
            return TrainPipelineSparseDist(model, None, loss_of, backward=self.engine.backward, step=self.engine.step, sync=False)
        return TrainPipelineSparseDist(model, self.dense_optimizer, loss_of, sync=False)

    # -- the loop ---------------------------------------------------------------

    def _announce(self) -> None:
        env, data, config = self.env, self.data, self.config
        self.say(
            f"dist_rec: DLRM on {data.train.__class__.__name__}, {env.world_size} process(es) "
            f"({env.backend or 'single'}, {env.device}), batch {config.train.batch_size} per process "
            f"({self.global_batch} global), {len(data.sparse_feature_names)} tables / "
            f"{sum(data.num_embeddings_per_feature):,} rows x {config.model.embedding_dim}, "
            f"{torch.get_num_threads()} thread(s) per process"
        )
        if self.engine is not None:
            self.say(f"dense: {self.engine.describe()}")
        if self.sharded is not None:
            self.say(f"sharding: {self.sharded.grid}, replicas synchronised every {self.sharded.sync_every} step(s)")
            self.say(str(self.sharded.plans["sparse_arch"]))
        if data.teacher_auc is not None:
            self.say(f"teacher AUC on the evaluation set (the ceiling): {data.teacher_auc:.4f}")

    def train(self) -> TrainResult:
        """Runs the loop to ``train.steps`` (or the end of finite data) and
        returns what rank 0 reports."""
        run, env = self.config.train, self.env
        self._announce()
        stream = self.data.train.batches(run.batch_size, env.rank, env.world_size, drop_last=True)
        step = first_step = self.checkpointer.resume(stream)
        batches = self._step_batches(stream, None if run.steps == 0 else run.steps - first_step)
        self.progress.start(first_step)
        try:
            while run.steps == 0 or step < run.steps:
                tick = time.perf_counter()
                try:
                    loss = self.pipeline.progress(batches)
                except StopIteration:
                    break
                self.replica_sync.after_optimizer_step()
                step += 1
                self.progress.record(step, loss.detach(), time.perf_counter() - tick)
                if self.checkpointer.should_save(step):
                    self._save(step)
                if self.evaluator.should_evaluate(step):
                    self.evaluator.evaluate(step)
                for hook in self.hooks:
                    hook.after_step(self, step)
            if step > first_step:
                self._save(step)
            final_eval = self.evaluator.evaluate(step, final=True)
        except BaseException as error:
            for hook in self.hooks:
                hook.on_failure(self, step, error)
            raise
        return self._finish(step, first_step, final_eval)

    def _save(self, step: int) -> None:
        directory = self.checkpointer.save(step)
        if directory is not None:
            for hook in self.hooks:
                hook.on_checkpoint(self, step, directory)

    def _step_batches(self, stream: Iterator[Batch], limit: Optional[int]) -> Iterator[Batch]:
        """The batches the steps train on, on the device: at most ``limit``
        (so the pipeline never starts a batch past the last step). A stream
        that does not promise every rank the same number of batches is
        agreed over the ranks before each one (a collective)."""
        agree = self.env.distributed and not getattr(self.data.train, "equal_batches_per_rank", False)
        taken = 0
        while limit is None or taken < limit:
            batch = next(stream, None)
            has_batch = _all_have_batch(batch is not None) if agree else batch is not None
            if not has_batch:
                return
            taken += 1
            yield batch.to(self.env.device)

    def _finish(self, step: int, first_step: int, final_eval: Optional[EvalMetrics]) -> TrainResult:
        self.log.close()
        result = TrainResult(
            steps=step,
            examples=step * self.global_batch,
            train_seconds=self.progress.train_seconds,
            examples_per_second=self.progress.throughput(step - first_step),
            final_eval=final_eval,
            teacher_auc=self.data.teacher_auc,
            losses=self.progress.losses,
            output_dir=self.output_dir,
            model=self.model,
            dense_engine=self.engine,
        )
        if self.env.is_main and self.output_dir is not None:
            plot_path = plot_training(self.log.records, self.data.teacher_auc, self.output_dir / "training.png")
            figures = summary(self.config, self.env, result, plot_path)
            (self.output_dir / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
            self.say(summary_table(figures))
        if self._own_group:
            destroy_process_group()
        return result


def _all_have_batch(has_batch: bool) -> bool:
    """Streams of unknown length can end at different steps on different
    ranks; every rank stops at the first step any of them cannot fill."""
    flag = torch.tensor([int(has_batch)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def train(config: TrainConfig, env: Optional[Environment] = None, quiet: bool = False) -> TrainResult:
    """Runs the training described by ``config`` in this process (one rank
    of the group when distributed). Returns what rank 0 reports."""
    return Trainer(config, env, quiet).train()
