"""The trainer's components: each knows when it acts, and is a null object when off.

The loop (``trainer.py``) asks each component at every step whether to
act: the replica sync (2D replicas, momentum-scaled increments), the
progress log (a line every ``log_every`` steps, metrics.jsonl), the
checkpointer (``checkpoint_every``, resume) and the evaluator
(``eval_every``). A capability that is off is its null object, so the loop
has no ``if`` for it. ``TrainerHook`` is what else may plug in: code run
after every step, after every checkpoint, or when a step fails (the seam
that recovery and background sync use).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from dist_rec.config import ConfigError, TrainConfig
from dist_rec.data.batch import Dataset
from dist_rec.fault.activity import ACTIVITY
from dist_rec.metrics import EvalMetrics
from dist_rec.trainer.environment import Environment
from dist_rec.trainer.evaluation import evaluate
from dist_rec.trainer.report import MetricsLog, clock

Say = Callable[..., None]


class TrainerHook:
    """Code the trainer runs at the loop's moments; every method a no-op.

    ``trainer`` is the running ``Trainer``; ``step`` counts the steps done."""

    def after_step(self, trainer, step: int) -> None:
        """After every step, once the components have acted."""

    def on_checkpoint(self, trainer, step: int, directory: Path) -> None:
        """After a checkpoint of ``step`` was taken, to be published at
        ``directory`` (an entry of the series; with ``checkpoint.async_save``
        it is still being written in the background)."""

    def on_failure(self, trainer, step: int, error: BaseException) -> None:
        """A step (or a component acting after it) raised ``error`` that
        recovery cannot absorb; the trainer raises it once every hook has
        seen it."""

    def before_recovery(self, trainer, step: int, error: BaseException) -> None:
        """A failed collective after ``step`` steps (or a switch to a pending
        epoch) is about to be recovered; this process's state is as the
        failure left it."""

    def after_restore(self, trainer, epoch, step: int) -> None:
        """A membership epoch formed and its state was restored; training
        resumes at ``step`` (also in a replacement process, once built)."""


# -- replica sync -------------------------------------------------------------------


class ReplicaSync:
    """Agrees 2D replicas (``DistributedModelParallel.sync``: every
    ``sync_every`` calls) and folds momentum-scaled increments in, right
    after each optimizer step, in the foreground."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync

    def after_optimizer_step(self) -> None:
        self._sync()


class NullReplicaSync:
    """One process with an optimizer that keeps no per-replica increments."""

    def after_optimizer_step(self) -> None:
        pass


class DenseSync:
    """The dense layers' replicas agreed by a rule on their parameters
    instead of DDP's gradient all-reduce (``sync.dense``: ma, easgd, bmuf):
    in the background (ShadowSync: a thread of rounds, started with the
    loop, stopped with it) or in the foreground every ``sync.every`` steps.
    The optimizer step and a checkpoint's snapshot hold the rounds off
    (``guard``, ``quiesced``). At the end the replicas are averaged once, so
    that the final model (evaluated and saved) is their consensus.

    Under recovery the rounds end with the failed epoch (``abandon``; a
    switch to a pending epoch stops them agreed: ``stop_rounds``) and start
    again on the new epoch's group once its state is restored (``start``,
    with a fresh rule for the group's size)."""

    def __init__(self, config, params, process_groups) -> None:
        from dist_rec.sync import ShadowSync

        s = self._settings = config.sync
        self.name, self.mode = s.dense, s.mode
        self.params = [p for p in params if p.numel()]
        process_groups.subgroup("dense_sync")  # its own: a background round never meets the step's collectives
        self._group = lambda: process_groups.group("dense_sync")
        self.rule = self._new_rule()
        if s.mode == "background":
            self.sync = ShadowSync(self.params, self.rule, self._group, interval_s=s.interval_s, duty=s.duty,
                                   kind="dense_sync", min_steps=s.every)  # fmt: skip
        else:
            self.sync = self._foreground()
        self._started = False
        self._earlier_rounds, self._earlier_seconds = 0, 0.0  # foreground syncs of earlier epochs

    @property
    def background(self) -> bool:
        return self.mode == "background"

    @property
    def rounds(self) -> int:
        return self._earlier_rounds + self.sync.rounds

    def _foreground(self):
        from dist_rec.sync import ForegroundSync

        return ForegroundSync(self.params, self.rule, self._group, every=self._settings.every, kind="dense_sync")

    def _new_rule(self, start: Optional[torch.Tensor] = None):
        from dist_rec.sync import make_rule

        s = self._settings
        return make_rule(s.dense, dist.get_world_size(self._group()), alpha=s.alpha, block_momentum=s.block_momentum,
                         block_lr=s.block_lr, nesterov=s.nesterov, start=start)  # fmt: skip

    def start(self) -> None:
        """Before the first step (after a resume too), and after a recovery
        restored a new epoch (a collective over its dense group): the
        replicas start equal (as DDP's constructor makes them), the rule
        fresh for the group's size (BMUF from that point, EASGD's centre
        from the first round's mean). A no-op, with no collective, once
        started (a replacement restarts it in its restore and is asked again
        at the top of the loop)."""
        if self._started:
            return
        group = self._group()
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p, dist.get_global_rank(group, 0), group=group)
        start = torch.cat([p.detach().reshape(-1) for p in self.params]) if self.name == "bmuf" else None
        self.rule = self._new_rule(start)
        self._started = True
        if self.background:
            if dist.get_world_size(group) > 1:  # a group of one (a degraded epoch) has nothing to agree
                self.sync.start(rule=self.rule)
        else:  # its step count starts over on every rank of the epoch (a replacement's is 0)
            self._earlier_rounds += self.sync.rounds
            self._earlier_seconds += self.sync.round_seconds
            self.sync = self._foreground()

    def guard(self, step: Callable[[], object]) -> Callable[[], object]:
        return self.sync.guard(step) if self.background else step

    def quiesced(self):
        return self.sync.quiesced() if self.background else contextlib.nullcontext()

    def after_optimizer_step(self) -> None:
        if self.background:
            self.sync.stepped()  # a background round waits for sync.every steps (BMUF's block)
        else:
            self.sync.after_optimizer_step()

    def stop(self) -> None:
        """Stops the rounds (agreed by every replica) and averages the replicas once."""
        self._started = False
        if self.background:
            self.sync.stop()
        group = self._group()
        with torch.no_grad():
            for p in self.params:
                dist.all_reduce(p, group=group)
                p.div_(dist.get_world_size(group))

    def stop_rounds(self) -> None:
        """Stops the rounds (agreed by every replica: the groups are intact)
        without the final average: the epoch is about to be switched for a
        pending one (ranks are back); ``start`` resumes on its groups."""
        self._started = False
        if self.background:
            self.sync.stop()

    def abandon(self, timeout_s: float = 10.0) -> bool:
        """After a failure (the groups aborted): the rounds end without an
        agreed stop and no round in flight adds any more. Returns whether
        the round thread ended within ``timeout_s``."""
        self._started = False
        return self.sync.abandon(timeout_s) if self.background else True

    def report(self, steps: int) -> dict:
        seconds = self._earlier_seconds + self.sync.round_seconds
        return {"dense": self.name, "mode": self.mode, "rounds": self.rounds,
                "rounds_per_step": round(self.rounds / max(1, steps), 3),
                "seconds_in_rounds": round(seconds, 2)}  # fmt: skip


class NullDenseSync:
    """``sync.dense: ddp``: DDP all-reduces the gradients in the backward."""

    background = False
    rounds = 0

    def start(self) -> None:
        pass

    def guard(self, step):
        return step

    def quiesced(self):
        return contextlib.nullcontext()

    def after_optimizer_step(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def stop_rounds(self) -> None:
        pass

    def abandon(self, timeout_s: float = 10.0) -> bool:
        return True

    def report(self, steps: int) -> Optional[dict]:
        return None


class EmbeddingSync:
    """``sync.embeddings: background``: the 2D shard replicas averaged by
    ShadowSync's rounds (``dist_rec.sync.embeddings``) instead of in the
    foreground every ``sharding.sync_every`` steps. Under recovery as
    ``DenseSync``: abandoned with a failed epoch, stopped agreed for a
    switch, started again once a new epoch is restored; not run in a
    degraded epoch (a replica group out: one copy of each shard)."""

    def __init__(self, config, dmp) -> None:
        from dist_rec.sync.embeddings import EmbeddingReplicaSync

        self.replicas = EmbeddingReplicaSync(dmp.sharded, dmp.process_groups, interval_s=config.sync.interval_s,
                                             duty=config.sync.duty)
        self._groups = dmp.process_groups
        self._started = False

    @property
    def rounds(self) -> int:
        return self.replicas.sync.rounds

    def start(self) -> None:
        """Starts the rounds on the current epoch's groups (no collective of
        its own: the rounds are, so every rank of the epoch starts them); a
        no-op once started."""
        if self._started:
            return
        self._started = True
        if self._groups.grid.replicas > 1:
            self.replicas.start()

    def stop(self) -> None:
        self._started = False
        self.replicas.stop()

    def stop_rounds(self) -> None:
        """See ``DenseSync.stop_rounds``."""
        self._started = False
        self.replicas.sync.stop()

    def abandon(self, timeout_s: float = 10.0) -> bool:
        """See ``DenseSync.abandon``."""
        self._started = False
        return self.replicas.abandon(timeout_s)

    def quiesced(self):
        return self.replicas.quiesced()

    def report(self, steps: int) -> dict:
        sync = self.replicas.sync
        return {"rounds": sync.rounds, "rounds_per_step": round(sync.rounds / max(1, steps), 3),
                "seconds_in_rounds": round(sync.round_seconds, 2),
                "rows_per_round": round(self.replicas.rows.rows_per_round(), 4)}  # fmt: skip


class NullEmbeddingSync:
    rounds = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def stop_rounds(self) -> None:
        pass

    def abandon(self, timeout_s: float = 10.0) -> bool:
        return True

    def quiesced(self):
        return contextlib.nullcontext()

    def report(self, steps: int) -> Optional[dict]:
        return None


# -- progress ---------------------------------------------------------------------


class ProgressLog:
    """The progress line every ``log_every`` steps (loss, examples/s, elapsed,
    ETA), its metrics.jsonl record, and the run's timing totals (the first
    log interval after a start or a recovery is warm-up: throughput counts
    the steps after it)."""

    def __init__(self, log: MetricsLog, log_every: int, total_steps: int, examples_per_step: int, env: Environment, say: Say) -> None:
        self.log, self.log_every, self.total_steps = log, log_every, total_steps
        self.env, self.say = env, say
        self.losses: List[float] = []
        self.train_seconds = 0.0
        self.warm_seconds, self.warm_examples = 0.0, 0
        self.all_examples = 0
        self._interval_loss, self._interval_steps, self._interval_time, self._interval_examples = 0.0, 0, 0.0, 0
        self.first_step = self._warm_from = 0
        self.started = time.perf_counter()

    def start(self, first_step: int) -> None:
        self.first_step = self._warm_from = first_step
        self.started = time.perf_counter()

    def resumed(self, step: int) -> None:
        """Training goes on at ``step`` after a recovery: a new warm-up."""
        self._warm_from = step
        self._interval_loss, self._interval_steps, self._interval_time, self._interval_examples = 0.0, 0, 0.0, 0

    def record(self, step: int, loss: torch.Tensor, seconds: float, examples: int) -> None:
        self.train_seconds += seconds
        self.all_examples += examples
        self._interval_time += seconds
        self._interval_loss += float(loss)
        self._interval_steps += 1
        self._interval_examples += examples
        if step > self._warm_from + self.log_every:
            self.warm_seconds += seconds
            self.warm_examples += examples
        if step % self.log_every == 0 or step == self.total_steps:
            self._line(step)

    def _line(self, step: int) -> None:
        if not self._interval_steps:
            return
        mean_loss = _mean_over_ranks(self._interval_loss / self._interval_steps, self.env)
        rate = self._interval_examples / max(self._interval_time, 1e-9)
        self.losses.append(mean_loss)
        now = time.perf_counter()
        self.log.write(dict(kind="train", step=step, loss=mean_loss, examples_per_second=rate, seconds=now - self.started,
                            unix=time.time()))  # fmt: skip
        eta = ""
        if self.total_steps and step > self.first_step:
            eta = f" | eta {clock((self.total_steps - step) * self.train_seconds / (step - self.first_step))}"
        total = f"/{self.total_steps}" if self.total_steps else ""
        self.say(
            f"step {step:>6}{total} | loss {mean_loss:.4f} | {rate:,.0f} ex/s | elapsed {clock(now - self.started)}{eta}"
        )
        self._interval_loss, self._interval_steps, self._interval_time, self._interval_examples = 0.0, 0, 0.0, 0

    def throughput(self) -> float:
        """Examples per second after the first log interval (all of a run
        shorter than two intervals)."""
        if self.warm_examples == 0:
            return self.all_examples / max(self.train_seconds, 1e-9)
        return self.warm_examples / max(self.warm_seconds, 1e-9)


def _mean_over_ranks(value: float, env: Environment) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / env.world_size


# -- checkpoints ------------------------------------------------------------------

from dist_rec.trainer.checkpointing import Checkpointer, NullCheckpointer  # noqa: E402  (their own module)


# -- evaluation -------------------------------------------------------------------


class Evaluator:
    """Exact AUC / NE / log loss over the evaluation set, every ``every``
    steps (0: only at the end) and at the end."""

    def __init__(self, model, dataset: Dataset, config: TrainConfig, env: Environment, total_steps: int, log: MetricsLog, say: Say) -> None:
        self.model, self.dataset, self.config, self.env = model, dataset, config, env
        self.every, self.total_steps, self.log, self.say = config.train.eval_every, total_steps, log, say

    def should_evaluate(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step != self.total_steps

    def evaluate(self, step: int, final: bool = False) -> Optional[EvalMetrics]:
        metrics = evaluate(self.model, self.dataset, self.config, self.env)
        self.log.write(dict(kind="eval", step=step, **metrics.as_dict()))
        if not final:
            self.say(f"eval @ step {step}: AUC {metrics.auc:.4f} | NE {metrics.ne:.4f} | log loss {metrics.log_loss:.4f}")
        return metrics


class NullEvaluator:
    """No evaluation set."""

    def should_evaluate(self, step: int) -> bool:
        return False

    def evaluate(self, step: int, final: bool = False) -> Optional[EvalMetrics]:
        return None
