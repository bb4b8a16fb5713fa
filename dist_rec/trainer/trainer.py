"""``Trainer``: DLRM training whose loop asks its components when to act.

One step is the pipelined one (``dist_rec.sharding.pipeline``) for every
sharding type: the next batch's ids travel while this batch trains (its
stages are empty where no table is model-parallel). After it the loop asks,
in order, the replica sync, the progress log, the recovery component, the
checkpointer and the evaluator whether to act (each a null object when off;
``components.py``, ``dist_rec.fault.recovery``), then runs the hooks
(``TrainerHook``: after every step, after every checkpoint, on failure).

Under the fault-tolerant launcher (``dist_rec.fault.launch``) a failed
step is recovered inside the loop: the survivors keep their memory, the
groups are re-formed with a replacement, only the lost state is restored,
and training resumes at the agreed step with every rank's data stream
re-opened there (``Recovery``). A replacement process restores right after
it is built and starts at that same step.

    trainer = Trainer(config)        # joins the process group, builds data, model, optimizers
    result = trainer.train()         # the loop; rank 0 prints progress and a summary
"""

from __future__ import annotations

import contextlib
import inspect
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dist_rec.config import ConfigError, TrainConfig
from dist_rec.data.batch import Batch
from dist_rec.data.epochs import EpochStream
from dist_rec.data.prefetch import BatchWorker, Prefetcher
from dist_rec.distributed import destroy_process_group, init_single_process_group
from dist_rec.fault.activity import ACTIVITY
from dist_rec.fault.membership import REPLACEMENT
from dist_rec.fault.recovery import NullRecovery, Recovery
from dist_rec.metrics import EvalMetrics
from dist_rec.optim.fused import MomentumScaledRowWiseAdagrad
from dist_rec.sharding.pipeline import TrainPipelineSparseDist
from dist_rec.trainer.builders import build_data, build_model, dense_optimizer, shard_model
from dist_rec.trainer.checkpointing import reconcile_settings
from dist_rec.trainer.components import (
    DenseSync,
    EmbeddingSync,
    NullDenseSync,
    NullEmbeddingSync,
    Checkpointer,
    Evaluator,
    NullCheckpointer,
    NullEvaluator,
    NullReplicaSync,
    ProgressLog,
    ReplicaSync,
    TrainerHook,
)
from dist_rec.trainer.environment import Environment, join_first_epoch, setup_environment
from dist_rec.trainer.report import MetricsLog, plot_training, read_records, summary, summary_table


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
    failures: List[Dict] = field(default_factory=list)  # failures survived (fault-tolerant launcher)


class _DataPosition:
    """Where the training stream stands, for checkpoints and recovery: the
    step (the global batches consumed, in the job as launched) and the
    reader's seek notes (``seek_state``) where it keeps any; with them the
    run's settings, compared at a resume (``reconcile_settings``)."""

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer
        self._settings: Optional[Dict] = None

    @property
    def global_batch(self) -> int:
        return self.trainer.config.train.batch_size * self.trainer.env.data_world_size

    def position(self, step: int) -> Dict:
        dataset = self.trainer.data.train
        seek = dataset.seek_state() if hasattr(dataset, "seek_state") else None
        if self._settings is None:  # (the run's settings do not change once it trains: built once)
            self._settings = self.trainer.config.to_dict()
        return {"step": int(step), "examples": int(step) * self.global_batch, "seek": seek, "config": self._settings}

    def check(self, extra) -> None:
        """Before a resume loads anything: the settings saved with it against this run's."""
        extra = extra if isinstance(extra, dict) else {}
        reconcile_settings(extra.get("config"), self.trainer.config, self.trainer.config.train.checkpoint_dir,
                           self.trainer._say)  # fmt: skip

    def seek(self, extra, directory) -> int:
        extra = extra if isinstance(extra, dict) else {}
        trainer = self.trainer
        for group in trainer.dense_optimizer.param_groups:  # the saved state carries the saved rate: this run's wins
            group["lr"] = trainer.config.optimizer.dense_lr
        if "step" in extra:
            step = int(extra["step"])
        else:  # checkpoints written before the step was recorded
            examples = int(extra.get("examples", 0))
            if examples % self.global_batch != 0:
                raise ConfigError(
                    f"The checkpoint in {directory} stopped after {examples} examples, not a multiple of this run's "
                    f"global batch {self.global_batch}; resume with a global batch that divides it."
                )
            step = examples // self.global_batch
        dataset = self.trainer.data.train
        if extra.get("seek") and hasattr(dataset, "restore_seek_state"):
            dataset.restore_seek_state(extra["seek"])
        return step


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
    ``evaluator``, ``progress``, ``recovery``.
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
        if env.member is not None:
            _check_recoverable(config)
        if config.model.meta_init and not env.distributed:
            raise ConfigError("Invalid model.meta_init=True for a single process. Must be False unless the tables are "
                              "sharded over several processes (torchrun, dist_rec.fault.launch).")  # fmt: skip
        self.hooks = list(hooks)
        self.quiet = quiet
        self.output_dir = Path(run.output_dir) if run.output_dir else None
        self.log = MetricsLog(None)

        self._own_group = False
        try:
            self._assemble(config, env, run)
        except BaseException:
            if getattr(self, "checkpointer", None) is not None:
                self.checkpointer.close()
            if getattr(self, "_batch_worker", None) is not None:
                self._batch_worker.close()
            if self._own_group:  # a refused start leaves no process group behind
                destroy_process_group()
            raise

    def _assemble(self, config: TrainConfig, env: Environment, run) -> None:
        self.data = build_data(config)
        # Forked now, while this process holds the data but no model (see BatchWorker).
        self._epochs: Optional[EpochStream] = None
        self._batch_worker = (BatchWorker(self.data.train, config.data.prefetch, on_state=self._apply_reader_state)
                              if self._prefetch_worker() == "process" else None)  # fmt: skip
        torch.manual_seed(run.seed)
        model = build_model(config, self.data, env.device)
        epoch = join_first_epoch(env, config)  # under the fault-tolerant launcher: now the model is built
        joining = epoch is not None and epoch.roles[env.member.rank] == REPLACEMENT
        self._open_outputs()
        if env.is_main and self.data.eval is not None and hasattr(self.data.eval, "teacher_auc"):
            self.data.teacher_auc = self.data.eval.teacher_auc()
        checkpoint_dir = Path(run.checkpoint_dir) if run.checkpoint_dir else None
        # Checkpoints are written by the sharded model, and tiered tables live in one: a group of one.
        self._own_group = (checkpoint_dir is not None or config.sharding.type == "planned") and not dist.is_initialized()
        if self._own_group:
            init_single_process_group()
        self.sharded = (
            shard_model(model, config, env, replicas=epoch.replicas if epoch else None, initial_sync=not joining, data=self.data)
            if dist.is_initialized() else None
        )  # fmt: skip
        self.process_groups = self.sharded.process_groups if self.sharded is not None else None
        self.model = self.sharded.unwrapped if self.sharded is not None else model
        trained = self.sharded if self.sharded is not None else model
        dense_params = [p for p in trained.parameters() if p.requires_grad]
        self.dense_optimizer = dense_optimizer(config, dense_params)
        self.dense_sync = (
            DenseSync(config, dense_params, self.sharded.process_groups)
            if config.sync.dense not in ("ddp", "none") and self.sharded is not None and env.distributed else NullDenseSync()
        )  # fmt: skip
        self.engine = None
        if run.dense_engine == "deepspeed":
            from dist_rec.engines.deepspeed_engine import DeepSpeedDenseEngine

            self.engine = DeepSpeedDenseEngine(self.sharded, self.dense_optimizer, run.zero_stage, run.batch_size)
            trained = self.engine
        self.pipeline = self._pipeline(trained)

        self.embedding_sync = NullEmbeddingSync()
        if self.sharded is not None and config.sync.embeddings == "background":
            self.embedding_sync = EmbeddingSync(config, self.sharded)
            self.replica_sync = NullReplicaSync()
        elif self.sharded is not None:
            self.replica_sync = ReplicaSync(self.sharded.sync)
        elif isinstance(self.model.sparse_arch.optimizer, MomentumScaledRowWiseAdagrad):
            self.replica_sync = ReplicaSync(self.model.sparse_arch.sync)  # one process: fold the increments in
        else:
            self.replica_sync = NullReplicaSync()
        self.recovery = Recovery(self, env.member) if env.member is not None else NullRecovery(self)
        self.position = _DataPosition(self)
        self.progress = ProgressLog(self.log, run.log_every, run.steps, self.examples_per_step, env, self._say)
        self.checkpointer = (
            Checkpointer(checkpoint_dir, run.checkpoint_every, run.steps, self.sharded, self.dense_optimizer,
                         self.position, self._say, at=self.recovery.at, config=config.checkpoint,
                         group=self._checkpoint_group(), lock=env.data_rank == 0,
                         mtbf_s=config.fault.mtbf_s, partial=env.member is not None,
                         num_shards=self.sharded.grid.group_size)  # fmt: skip
            if checkpoint_dir is not None else NullCheckpointer(self.sharded)
        )
        self.evaluator = (
            Evaluator(self.model, self.data.eval, config, env, run.steps, self.log, self._say)
            if self.data.eval is not None else NullEvaluator()
        )
        self._resume_step: Optional[int] = None
        self._examples = 0
        self._failure_records: List[Dict] = []
        self._prefetcher = None
        self._data_skips: Optional[Dict] = None
        if joining:  # a replacement: the running ranks hand it their state
            self._resume_step = self.recovery.restore(epoch, env.member.rank, 0, time.time())

    # -- what the components and recovery ask --------------------------------------

    @property
    def examples_per_step(self) -> int:
        """Samples one step trains now (fewer while a replica group is out)."""
        return self.config.train.batch_size * self.env.world_size

    @property
    def global_batch(self) -> int:
        return self.config.train.batch_size * self.env.data_world_size

    def _say(self, *parts) -> None:
        if self.env.is_main and not self.quiet:
            print(*parts, flush=True)

    def _open_outputs(self) -> None:
        """metrics.jsonl and config.yaml on the main rank (the lowest rank
        of the current epoch: it may change under recovery; the file is
        appended to, never truncated, by whoever is main)."""
        env = self.env
        self.log.close()
        if env.is_main and self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(self.config.to_yaml())
            fresh = env.member is None or env.member.incarnation == 0 and env.member.epoch.id == 0
            self.log.open(self.output_dir / "metrics.jsonl", append=not fresh or self._resumable())
        else:
            self.log.open(None)

    def _checkpoint_group(self):
        """The checkpoint writer's own group, made now (a collective, in the
        same order on every rank) and asked for again at each save: a
        recovery re-forms it."""
        self.process_groups.subgroup("checkpoint")
        return lambda: self.process_groups.group("checkpoint")

    def _resumable(self) -> bool:
        """A checkpoint to resume from is there: the run continues a history."""
        from dist_rec.checkpoint import CheckpointReader

        directory = self.config.train.checkpoint_dir
        try:
            return bool(directory) and CheckpointReader.find(directory) is not None
        except (OSError, ValueError):
            return False

    def _pipeline(self, trained) -> TrainPipelineSparseDist:
        loss_fn = nn.BCEWithLogitsLoss()

        def loss_of(_, batch: Batch) -> torch.Tensor:
            return loss_fn(trained(batch.dense_features, batch.sparse_features).reshape(-1), batch.labels)

        model = self.sharded if self.sharded is not None else self.model
        if self.engine is not None:  # the engine runs the backward and the dense step (and zeroes the gradients)
            return TrainPipelineSparseDist(model, None, loss_of, backward=self.engine.backward, step=self.engine.step, sync=False)
        return TrainPipelineSparseDist(model, self.dense_optimizer, loss_of, sync=False,
                                       step=self.dense_sync.guard(self.dense_optimizer.step))  # fmt: skip

    def after_recovery(self, step: int) -> None:
        """Recovery formed a new epoch: this rank's rank, the job's size and
        the main rank may have changed."""
        self._open_outputs()
        self.evaluator.env = self.env

    def start_syncs(self) -> None:
        """The replica syncs start: at the top of the loop, and once recovery
        restored a new epoch (its last act, on every rank of it, survivors
        and a replacement alike) on the new groups. In this order on every
        rank: the dense replicas' broadcast is a collective, and so are the
        rounds. Started syncs are not started again (a replacement, started
        by its restore, comes to the top of the loop after it)."""
        self.dense_sync.start()
        self.embedding_sync.start()

    def sync_rounds(self) -> Dict[str, int]:
        """The background and foreground sync rounds this process ran so far
        (for the event log), per sync that is on."""
        parts = (("dense_sync", self.dense_sync), ("embedding_sync", self.embedding_sync))
        return {f"{name}_rounds": part.rounds for name, part in parts
                if not isinstance(part, (NullDenseSync, NullEmbeddingSync))}  # fmt: skip

    def restore_data_position(self, source: int) -> None:
        """The data reader's seek notes from ``source`` (a collective)."""
        dataset = self.data.train
        box = [dataset.seek_state() if hasattr(dataset, "seek_state") and dist.get_rank() == source else None]
        dist.broadcast_object_list(box, src=source)
        if box[0] and hasattr(dataset, "restore_seek_state"):
            dataset.restore_seek_state(box[0])

    def record_failure(self, record: Dict) -> None:
        """A failure survived, once training went on after it (main rank: metrics.jsonl)."""
        self._failure_records.append(record)
        self.log.write({"kind": "failure", **{k: v for k, v in record.items() if k != "summary"}})
        self._say(
            f"recovered: {record['summary']}; {record['seconds_to_first_step']:.1f} s from the failure to the first "
            f"step after it (restore {record['restore_seconds']:.2f} s, {record['restored_bytes'] / 2**20:.1f} MiB)"
        )

    # -- the loop ---------------------------------------------------------------

    def _announce(self) -> None:
        env, data, config = self.env, self.data, self.config
        self._say(
            f"dist_rec: DLRM on {data.train.__class__.__name__}, {env.world_size} process(es) "
            f"({env.backend or 'single'}, {env.device}), batch {config.train.batch_size} per process "
            f"({self.examples_per_step} global), {len(data.sparse_feature_names)} tables / "
            f"{sum(data.num_embeddings_per_feature):,} rows x {config.model.embedding_dim}, "
            f"{torch.get_num_threads()} thread(s) per process, batches read by "
            + {"inline": "the training thread", "process": "a worker process", "thread": "a worker thread"}[self._prefetch_worker()]
        )
        if self.engine is not None:
            self._say(f"dense: {self.engine.describe()}")
        if self.sharded is not None:
            self._say(f"sharding: {self.sharded.grid}, replicas synchronised every {self.sharded.sync_every} step(s)")
            self._say(str(self.sharded.plans["sparse_arch"]))
        if env.member is not None:
            self._say(f"fault tolerance: recovery under dist_rec.fault.launch, collectives time out after "
                      f"{config.fault.timeout_s:.0f} s")  # fmt: skip
        if data.teacher_auc is not None:
            self._say(f"teacher AUC on the evaluation set (the ceiling): {data.teacher_auc:.4f}")

    def _stream(self, step: int) -> Iterator[Batch]:
        """This rank's training batches from global batch ``step`` on (a
        seek), over ``train.epochs`` passes, on the device, at most up to
        ``train.steps``; prepared ``data.prefetch`` batches ahead by a
        background thread."""
        run, env = self.config.train, self.env
        self._close_stream()
        dataset = self.data.train
        if step == 0 or "start_step" in inspect.signature(dataset.batches).parameters:
            stream = self._epochs = EpochStream(dataset, run.epochs, run.batch_size, env.data_rank, env.data_world_size,
                                                start_step=step)  # fmt: skip
        else:  # a dataset that cannot seek: read and drop what came before
            warnings.warn(f"{type(dataset).__name__}.batches() takes no start_step: resuming at step {step} reads the "
                          f"{step} batches before it again.", stacklevel=2)  # fmt: skip
            stream = self._epochs = EpochStream(dataset, run.epochs, run.batch_size, env.data_rank, env.data_world_size)
            for _ in range(step):
                next(stream, None)
        data = self.config.data
        if self._batch_worker is not None and self._batch_worker.dataset is not dataset:
            # data.train was replaced after the worker was forked (a test, a benchmark): it cannot read the new one.
            self._batch_worker.close()
            self._batch_worker = None
        if self._batch_worker is not None:
            seek = dataset.seek_state() if hasattr(dataset, "seek_state") else None
            stream = self._prefetcher = self._batch_worker.start(run.epochs, run.batch_size, env.data_rank,
                                                                 env.data_world_size, step, seek)  # fmt: skip
        elif self._prefetch_worker() == "thread":
            stream = self._prefetcher = Prefetcher(stream, data.prefetch)
        return self._step_batches(stream, None if run.steps == 0 else run.steps - step)

    def _apply_reader_state(self, state: Dict) -> None:
        """The state of the reader in the worker process, after a batch:
        where the epochs stand, its skip counts and its seek notes."""
        reader = getattr(self.data.train, "dataset", self.data.train)  # under a held-out split: the file reader
        if self._epochs is not None:
            epochs = self._epochs
            epochs.epoch, epochs.steps_per_epoch, epochs.exhausted = state["epoch"], state["steps_per_epoch"], state["exhausted"]
        if state["skips"] is not None:
            reader.skips = state["skips"]
        if state.get("seek") is not None:
            reader.restore_seek_state(state["seek"])

    def _prefetch_worker(self) -> str:
        """Who prepares the batches: "process", "thread" or "inline" (see
        data.prefetch_worker; "auto": a thread for binary data, whose reads
        are numpy slicing that a hand-over between processes would cost more
        than, a worker process for the parsers and the generator)."""
        data = self.config.data
        if not data.prefetch:
            return "inline"
        if data.prefetch_worker != "auto":
            return data.prefetch_worker
        return "thread" if data.source in ("binary", "criteo_binary") else "process"

    def _close_stream(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def _data_report(self, step: int, first_step: int) -> None:
        """After the loop: a run with no step is an error; data that ran out
        before ``train.steps`` and skipped lines are said."""
        run, dataset = self.config.train, self.data.train
        if step == 0:
            raise ValueError(f"No training step: the training data ({type(dataset).__name__}) holds fewer than one "
                             f"global batch of {self.examples_per_step} samples (train.batch_size="
                             f"{run.batch_size} x {self.env.data_world_size} processes). Nothing was trained.")  # fmt: skip
        epochs = self._epochs
        if run.steps and step < run.steps and epochs is not None and epochs.exhausted:
            per_epoch = f" ({epochs.steps_per_epoch} steps per epoch)" if epochs.steps_per_epoch else ""
            self._say(f"data ran out at step {step} of train.steps={run.steps}: train.epochs={run.epochs} pass(es) "
                      f"over the training data{per_epoch}; raise train.epochs to train longer")  # fmt: skip
        skips = getattr(getattr(dataset, "dataset", dataset), "skips", None)
        if skips is not None and skips.skipped:
            self._data_skips = skips.summary()
            self.log.write({"kind": "skipped", "step": step, **self._data_skips})
            self._say(f"skipped lines: {skips.describe()}")

    def train(self) -> TrainResult:
        """Runs the loop to ``train.steps`` (or the end of finite data) and
        returns what rank 0 reports."""
        run = self.config.train
        self._announce()
        try:
            step = first_step = self._resume_step if self._resume_step is not None else self.checkpointer.resume()
        except BaseException:  # a refused resume: nothing of this run is left holding the directory
            self._close_after_failure()
            raise
        if first_step > 0 and self.env.member is None:
            self.log.trim_after(first_step)
        batches = self._stream(step)
        self.progress.start(first_step)
        self.start_syncs()  # a no-op in a replacement: its restore started them
        final_eval: Optional[EvalMetrics] = None
        finished = False
        while not finished:
            try:
                while run.steps == 0 or step < run.steps:
                    tick = time.perf_counter()
                    ACTIVITY.set(f"step {step + 1}: forward, backward and the dense step")
                    try:
                        loss = self.pipeline.progress(batches)
                    except StopIteration:
                        break
                    ACTIVITY.set(f"step {step + 1}: replica sync")
                    self.replica_sync.after_optimizer_step()
                    self.dense_sync.after_optimizer_step()
                    step += 1
                    if loss.device.type == "cpu" or step % max(1, run.log_every) == 0:  # no extra GPU sync per step
                        _check_finite_loss(loss, step, self.checkpointer)
                    self._examples += self.examples_per_step
                    self.progress.record(step, loss.detach(), time.perf_counter() - tick, self.examples_per_step)
                    self.recovery.after_step(step)
                    if self.checkpointer.should_save(step):
                        self._save(step)
                    if self.evaluator.should_evaluate(step):
                        ACTIVITY.set(f"evaluation at step {step}")
                        self.evaluator.evaluate(step)  # background rounds go on (holding them would stall the peers)
                    for hook in self.hooks:
                        hook.after_step(self, step)
                self._close_stream()
                self._data_report(step, first_step)
                self.recovery.finish()
                self.dense_sync.stop()
                self.embedding_sync.stop()
                if step > first_step:
                    self._save(step)
                self.checkpointer.finish()
                ACTIVITY.set(f"final evaluation at step {step}")
                final_eval = self.evaluator.evaluate(step, final=True)
                finished = True
            except BaseException as error:
                if not self.recovery.can_recover(error):
                    for hook in self.hooks:
                        hook.on_failure(self, step, error)
                    self._close_after_failure()
                    raise
                for hook in self.hooks:
                    hook.before_recovery(self, step, error)
                step = self.recovery.recover(error, step)
                batches = self._stream(step)
                self.progress.resumed(step)
        return self._finish(step, first_step, final_eval)

    def _close_after_failure(self) -> None:
        """A failure the run stops on: the writer's save in flight ends, the
        directory's lock and a group of our own are released (the process
        may go on: a test, a notebook)."""
        self._close_stream()
        if self._batch_worker is not None:
            self._batch_worker.close()
        if not self.env.distributed:
            self.checkpointer.abandon()
        self.checkpointer.close()
        if self._own_group:
            destroy_process_group()
            self._own_group = False

    def _quiesced(self):
        """No background sync round copies or adds meanwhile."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.dense_sync.quiesced())
        stack.enter_context(self.embedding_sync.quiesced())
        return stack

    def _save(self, step: int) -> None:
        # A background round never lands in the middle of the snapshot (a synchronous save holds the rounds
        # for its whole write: the peers' rounds wait, up to fault.timeout_s).
        with self._quiesced():
            directory = self.checkpointer.save(step)
        if directory is not None:
            for hook in self.hooks:
                hook.on_checkpoint(self, step, directory)
            progress = self.progress
            self.checkpointer.choose_interval(progress.train_seconds / max(1, step - progress.first_step),
                                              len(self.recovery.failures), progress.train_seconds)  # fmt: skip

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
        result = TrainResult(
            steps=step,
            examples=self._examples,
            train_seconds=self.progress.train_seconds,
            examples_per_second=self.progress.throughput(),
            final_eval=final_eval,
            teacher_auc=self.data.teacher_auc,
            losses=self.progress.losses,
            output_dir=self.output_dir,
            model=self.model,
            dense_engine=self.engine,
            failures=list(self.recovery.failures),
        )
        self.log.close()
        self.checkpointer.close()
        if self._batch_worker is not None:
            self._batch_worker.close()
        if self.env.is_main and self.output_dir is not None:
            records = read_records(self.output_dir / "metrics.jsonl")
            plot_path = plot_training(records, self.data.teacher_auc, self.output_dir / "training.png")
            failures = [r for r in records if r.get("kind") == "failure"]
            figures = summary(self.config, self.env, result, plot_path, failures)
            if self._data_skips is not None:
                figures["skipped_lines"] = self._data_skips
            for name, part in (("dense_sync", self.dense_sync), ("embedding_sync", self.embedding_sync)):
                figures_of_part = part.report(step - first_step)
                if figures_of_part is not None:
                    figures[name] = figures_of_part
            if self.sharded is not None:
                from dist_rec.placement.tiered import tier_report

                tiers = tier_report([st for sharded in self.sharded.sharded.values() for st in sharded.storages()],
                                    step - first_step)  # fmt: skip
                if tiers is not None:
                    figures["tiers_rank0"] = tiers
            (self.output_dir / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
            self._say(summary_table(figures))
        if self.env.member is not None:
            self.env.member.events.write("done", step=step, **self.sync_rounds())
            self.env.member.close()
        if self._own_group:
            destroy_process_group()
        return result


def _check_recoverable(config: TrainConfig) -> None:
    """What recovery under the fault-tolerant launcher cannot carry yet."""
    if config.train.dense_engine != "ddp":
        raise ConfigError("Invalid train.dense_engine={!r} under dist_rec.fault.launch. Must be 'ddp' (recovery "
                          "re-forms DDP; DeepSpeed's engine is not rebuilt).".format(config.train.dense_engine))
    if config.optimizer.dense == "shampoo":
        raise ConfigError("Invalid optimizer.dense='shampoo' under dist_rec.fault.launch. Must be sgd, adagrad or adam "
                          "(Shampoo's blocks are spread over the ranks and not redistributed by recovery yet).")


class DivergedError(FloatingPointError):
    """The loss is not finite: training cannot go on, and nothing more is saved."""


def _check_finite_loss(loss: torch.Tensor, step: int, checkpointer) -> None:
    if not bool(torch.isfinite(loss.detach()).all()):
        last = checkpointer.latest()
        raise DivergedError(
            f"The loss is {loss.item()} at step {step}: the model diverged (try lower optimizer.dense_lr / "
            f"optimizer.sparse_lr, or look for non-finite inputs). Nothing more is saved; "
            + (f"the last good checkpoint is {last}." if last is not None else "there is no checkpoint.")
        )


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
