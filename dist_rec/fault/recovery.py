"""Recovery inside the trainer: a dead rank costs the survivors a pause,
not their state.

``Recovery`` is the trainer's component under the fault-tolerant launcher
(``NullRecovery`` otherwise: any failure ends the run, as before). When a
step (or a save, or an evaluation) fails in a collective, every survivor:

1. makes its other collectives fail at once, so that every peer notices
   (``dist_rec.distributed.abort``), reports, and drops the step in flight;
   the background sync rounds (ShadowSync) are abandoned with the groups;
2. joins the next membership epoch, keeping its memory (``member.join``);
3. re-forms every group in the same process (``ProcessGroups.rebuild``);
4. restores what the epoch needs (``restore``), a collective of the new
   epoch that a replacement process runs too, right after it is built:
   every rank tells its role and step; the most recent rank is the source
   of the dense layers, the dense optimizer, the counters and the data
   position; a shard whose replica group kept a live copy is broadcast from
   it (2D: nothing is lost); a replacement whose shard has no live copy
   loads only that shard from the newest complete checkpoint (1D partial
   recovery: the portion of lost samples is counted); a survivor keeps
   its own shards untouched;
5. starts the replica syncs again on the new groups (the dense replicas
   broadcast, the background rounds with a rule for the new group size;
   embedding rounds only with 2 or more replica groups), the restore's last
   act, on every rank of the epoch in the same order;
6. resumes at the source's step, each rank's data stream re-opened there
   by seeking.

Ranks coming back to a degraded 2D job switch without a failure: the
running ranks agree, one step behind and without waiting (an all-reduce
started after each step and read after the next), to leave for the
pending epoch at the same step boundary; their background rounds stop
agreed there (the groups are intact).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from dist_rec.distributed.abort import abort_communication
from dist_rec.distributed.errors import is_collective_failure
from dist_rec.fault.activity import ACTIVITY
from dist_rec.fault.inject import FailureInjector
from dist_rec.fault.membership import REPLACEMENT, SURVIVOR, Epoch, RestorePlan, restore_plan


class Rejoin(Exception):
    """The running ranks agreed to switch to a pending epoch (ranks are back)."""


class NullRecovery:
    """No fault-tolerant launcher: a failure ends the run (torchrun may
    restart the whole job, which resumes from its checkpoint). Injected
    failures and the event log work as under the launcher (the
    incarnation is torchrun's restart count), for a full-restart baseline."""

    def __init__(self, trainer=None) -> None:
        import os

        from dist_rec.fault.member import EventLog

        self.failures: List[Dict] = []
        self.events = EventLog(None, 0, 0)
        self.injector = FailureInjector([], 0, 0)
        if trainer is None:
            return
        config, env = trainer.config, trainer.env
        incarnation = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if config.fault.event_log and config.train.output_dir and config.fault.inject:
            self.events = EventLog(Path(config.train.output_dir) / "fault_events.jsonl", env.rank, incarnation)
        self.injector = FailureInjector(config.fault.inject, env.rank, incarnation,
                                        note=lambda **f: self.events.write("injected", **f))  # fmt: skip

    def after_step(self, step: int) -> None:
        self.events.write("step", step=step)
        self.injector.at("step", step)

    def at(self, place: str, step: int) -> None:
        self.injector.at(place, step)

    def can_recover(self, error: BaseException) -> bool:
        return False

    def recover(self, error: BaseException, step: int) -> int:
        raise error

    def finish(self) -> None:
        pass


class Recovery:
    """Recovery of one trainer (see the module docstring).

    Args:
        trainer: the ``Trainer`` (its model, optimizer, pipeline, data,
            checkpointer and environment are what is recovered).
        member (FaultMember): this process's place in the job.
    """

    def __init__(self, trainer, member) -> None:
        self.trainer, self.member = trainer, member
        self.injector = FailureInjector(
            trainer.config.fault.inject, member.rank, member.incarnation, note=lambda **f: member.events.write("injected", **f)
        )
        self.failures: List[Dict] = []  # every failure this process took part in recovering from
        self._control = None  # (tensor, work): the pending-epoch agreement of the previous step
        self._open: Optional[Dict] = None  # the failure record waiting for its first completed step
        self.phases: Dict[str, float] = {}  # seconds of the last recovery's join and rebuild (the event log says)
        member.on_abort(lambda reason: abort_communication(reason, keep_ports=[member.port]))

    # -- every step ------------------------------------------------------------------

    def at(self, place: str, step: int) -> None:
        self.injector.at(place, step)

    def after_step(self, step: int) -> None:
        """Heartbeat state, the step's event, injected failures, and the
        agreement (one step behind) to switch to a pending epoch: raises
        ``Rejoin`` on every rank at the same step when it is time."""
        member = self.member
        member.training(step)
        member.events.write("step", step=step, epoch=member.epoch.id)
        if self._open is not None:
            self._close_record(step)
        self.injector.at("step", step)
        pending = member.pending  # read once: the monitor thread writes it
        flag = torch.tensor([1 if pending is not None and pending > member.epoch.id else 0], dtype=torch.int32)
        agreed = 0
        if self._control is not None:
            previous, work = self._control
            work.wait()
            agreed = int(previous.item())
        self._control = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True))
        if agreed:
            self._control[1].wait()
            self._control = None
            raise Rejoin()

    def finish(self) -> None:
        if self._control is not None:
            self._control[1].wait()
            self._control = None

    # -- after a failure -----------------------------------------------------------------

    def can_recover(self, error: BaseException) -> bool:
        """A failed collective (or a switch) is recovered; a program error is
        not. An error that does not say it is a failed collective still is
        one if the coordinator aborts this epoch within a few heartbeats
        (transports word their failures in many ways)."""
        if not isinstance(error, Exception):  # SystemExit (a fenced process, the job ended), KeyboardInterrupt
            return False
        if isinstance(error, Rejoin) or is_collective_failure(error):
            return True
        return self.member.aborted.wait(timeout=max(2.0, 4 * self.member.config.heartbeat_s))

    def recover(self, error: BaseException, step: int) -> int:
        """Leaves the failed epoch, joins the next, restores; returns the step
        to resume from. Failures during recovery start it over."""
        member, trainer = self.member, self.trainer
        detected = time.time()
        switching = isinstance(error, Rejoin)
        if switching:
            member.say(f"after step {step}: switching to the pending epoch (ranks are back)")
            self._stop_syncs(step)
        else:
            member.say(f"failed after step {step}, during {ACTIVITY.describe()}: {type(error).__name__}: {str(error)[:300]}")
            member.report_failure(step, error)
            abort_communication(f"step {step + 1} failed", keep_ports=[member.port])
            self._abandon_syncs()
        trainer.pipeline.reset()
        # A save in flight fails with the groups (a switch lets it finish); the next one is a base.
        trainer.checkpointer.abandon(cancel=not switching)
        self._control = None
        while True:
            try:
                epoch = member.join("intact", step)
                switching = False
                joined = time.time()
                ACTIVITY.set(f"epoch {epoch.id}: re-forming the process groups")
                self._rebuild(epoch)
                self.phases = {"join_s": round(joined - detected, 3), "rebuild_s": round(time.time() - joined, 3)}
                resume = self.restore(epoch, member.rank, step, detected)
                self.phases = {}
                return resume
            except Exception as failure:  # a failure while recovering: again
                if not (member.aborted.is_set() or is_collective_failure(failure)):
                    raise
                member.say(f"recovery failed ({type(failure).__name__}: {str(failure)[:200]}); joining the next epoch")
                member.report_failure(step, failure)
                abort_communication("recovery failed", keep_ports=[member.port])
                self._abandon_syncs()  # restarted by a restore that failed after it

    def _stop_syncs(self, step: int) -> None:
        """A switch: the groups are intact and every running rank switches
        at this step, so the background rounds stop agreed. A round that
        fails meanwhile (a rank died during the switch) is a failure: its
        rounds are abandoned and the join finds the next epoch."""
        trainer = self.trainer
        try:
            trainer.dense_sync.stop_rounds()
            trainer.embedding_sync.stop_rounds()
        except Exception as failure:
            if not self.can_recover(failure):
                raise
            self.member.say(f"the sync rounds failed while switching after step {step} ({type(failure).__name__}: "
                            f"{str(failure)[:200]}); abandoning them")  # fmt: skip
            self._abandon_syncs()

    def _abandon_syncs(self) -> None:
        """The groups were aborted: the background rounds end without an
        agreed stop (a round in flight fails with the groups and adds
        nothing), before the groups are re-formed; the restore starts them
        again on the new ones."""
        trainer = self.trainer
        for name, sync in (("dense", trainer.dense_sync), ("embedding", trainer.embedding_sync)):
            if not sync.abandon(timeout_s=10.0):
                self.member.say(f"the {name} sync's round thread did not end within 10 s; it adds nothing any more")

    def _rebuild(self, epoch: Epoch) -> None:
        env, groups = self.trainer.env, self.trainer.process_groups
        env.rank, env.world_size = epoch.rank_of(self.member.rank), epoch.world_size
        groups.rebuild(rank=env.rank, world_size=env.world_size, replicas=epoch.replicas, store=self.member.store.client,
                       prefix=epoch.prefix)  # fmt: skip

    # -- the restore collective ------------------------------------------------------

    def restore(self, epoch: Epoch, original_rank: int, step: int, detected: float) -> int:
        """Everything a new epoch's ranks must agree on (a collective over
        it; see the module docstring). Returns the step to resume from."""
        trainer, member = self.trainer, self.member
        role = epoch.roles[original_rank]
        ACTIVITY.set(f"epoch {epoch.id}: restoring state ({role})")
        started = time.perf_counter()
        dmp = trainer.sharded
        mine = {
            "rank": dist.get_rank(), "original": original_rank, "role": role, "step": int(step),
            "sync_steps": dmp.sync_steps, "detected": detected,
        }  # fmt: skip
        infos: List[Optional[Dict]] = [None] * dist.get_world_size()
        dist.all_gather_object(infos, mine)
        grid = dmp.process_groups.grid
        replica_groups = [list(g) for g in grid.replica_groups] if grid.replicas > 1 else [[r] for r in range(grid.world_size)]
        plan = restore_plan(infos, replica_groups)
        if role == REPLACEMENT:
            self.injector.at("restore", step)
        if plan.source is None:
            resume, checkpoint_step = self._restore_all_from_checkpoint()
            plan.resume_step = resume
        else:
            checkpoint_step = self._restore_from_source(plan, infos)
            resume = plan.resume_step
        restored_bytes = self._restored_bytes
        record = self._record(epoch, plan, infos, resume, checkpoint_step, detected, restored_bytes,
                              time.perf_counter() - started)  # fmt: skip
        member.events.write("restored", epoch=epoch.id, role=role, resume_step=resume,
                            own_restored_bytes=getattr(self, "_own_restored_bytes", 0), **self.phases,
                            **trainer.sync_rounds(), **{
            k: record[k] for k in ("recovery", "lost_samples", "restored_bytes", "restore_seconds")})  # fmt: skip
        member.say(f"epoch {epoch.id} formed as {epoch.describe()}; {record['summary']}; resuming at step {resume}")
        trainer.after_recovery(resume)
        for hook in trainer.hooks:
            hook.after_restore(trainer, epoch, resume)
        # Last: the replica syncs start on the new groups (collectives, in the same order on every rank: the
        # survivors here, a replacement too, in its own restore), once the hooks saw the restored state.
        trainer.start_syncs()
        return resume

    def _restore_from_source(self, plan: RestorePlan, infos) -> int:
        trainer = self.trainer
        dmp, me = trainer.sharded, dist.get_rank()
        self._restored_bytes = 0
        _broadcast_dense(trainer, plan.source)
        checkpoint_step = None
        needs = set(plan.needs_shards)
        group = dmp.process_groups.replica_group
        shards = [local for sharded in dmp.sharded.values() for local in sharded.local_shards()]
        if me in needs and plan.shard_sources[me] is None:
            checkpoint_step = self._restore_local_from_checkpoint()
        elif group is not None:
            members = dist.get_process_group_ranks(group)
            sources = {plan.shard_sources[r] for r in members if r in needs}
            if sources:
                (source,) = sources  # a replica group restores from its one most recent member
                for local in shards:
                    weight, state = local.read()
                    for tensor in (weight, *state.values()):
                        dist.broadcast(tensor, src=source, group=group)
                        if me in needs:
                            self._restored_bytes += tensor.numel() * tensor.element_size()
                    local.write(weight, state)
        if any(info["role"] != SURVIVOR for info in infos):
            for sharded in dmp.sharded.values():
                tables = sharded.data_parallel_tables()
                if tables:
                    exchange = sharded._data_parallel_group()
                    for local in tables:
                        weight, state = local.read()
                        for tensor in (weight, *state.values()):
                            dist.broadcast(tensor, src=plan.source, group=exchange)
                        local.write(weight, state)
        dmp.sync_steps = int(infos[plan.source]["sync_steps"])
        trainer.restore_data_position(plan.source)
        self._own_restored_bytes = self._restored_bytes
        outcomes: List[Optional[tuple]] = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, (checkpoint_step, self._restored_bytes))  # every rank learns what came back
        self._restored_bytes = sum(b for _, b in outcomes)
        known = [s for s, _ in outcomes if s is not None]
        return known[0] if known else None

    def _restore_local_from_checkpoint(self) -> int:
        """This rank's shards from the newest complete checkpoint; the fresh
        initial rows (step 0) when there is none yet."""
        from dist_rec.checkpoint import CheckpointReader, resolve_chain, restore_local_shards

        directory = self.trainer.checkpointer.directory
        if directory is None or CheckpointReader.find(directory) is None:
            self.member.say("no checkpoint yet: the lost shards restart from fresh initial rows (step 0)")
            for sharded in self.trainer.sharded.sharded.values():
                if not sharded.initialised:
                    sharded.reset_parameters()
            return 0
        restored = restore_local_shards(directory, self.trainer.sharded)
        self._restored_bytes = sum(
            (w.numel() * w.element_size() + sum(t.numel() * t.element_size() for t in s.values()))
            for w, s in (local.read() for local in restored)
        )
        return int(resolve_chain(directory)[-1].step)

    def _restore_all_from_checkpoint(self):
        """No rank kept live state (every process is new): the whole job
        resumes from its checkpoint, or starts over when there is none."""
        trainer = self.trainer
        self._restored_bytes = self._own_restored_bytes = 0
        step = trainer.checkpointer.resume_collective()
        return step, step

    def _record(self, epoch, plan, infos, resume, checkpoint_step, detected, restored_bytes, seconds) -> Dict:
        trainer = self.trainer
        global_batch = trainer.config.train.batch_size * trainer.env.data_world_size
        lost_steps = 0 if checkpoint_step is None else max(0, resume - checkpoint_step)
        fraction = _checkpoint_fraction(plan, infos, trainer)
        replaced = sorted(i["original"] for i in infos if i["role"] == REPLACEMENT)
        back = sorted(i["original"] for i in infos if i["role"] != SURVIVOR)
        if plan.source is None:
            kind = "full restart"
        elif plan.from_checkpoint:
            kind = "partial recovery"
        elif plan.needs_shards:
            kind = "replica rebuild"
        else:
            kind = "degraded" if epoch.world_size < trainer.env.data_world_size else "re-formed"
        record = {
            "recovery": kind, "epoch": epoch.id, "failure_step": resume, "replaced": replaced, "back": back,
            "detected_unix": min(i["detected"] for i in infos), "restore_seconds": round(seconds, 3),
            "restored_bytes": int(restored_bytes), "checkpoint_step": checkpoint_step,
            "lost_samples": int(lost_steps * global_batch) if fraction > 0 else 0,
            "lost_fraction": fraction, "members": epoch.members,
        }  # fmt: skip
        parts = [kind]
        if plan.needs_shards:
            parts.append(f"shards of ranks {back} restored " + ("from checkpoint step " + str(checkpoint_step)
                         if plan.from_checkpoint else "from a live replica"))  # fmt: skip
        parts.append(f"{record['lost_samples']:,} samples' updates to {fraction:.1%} of the embedding rows lost")
        record["summary"] = "; ".join(parts)
        self._open = record
        return record

    def _close_record(self, step: int) -> None:
        record, self._open = self._open, None
        record["resumed_unix"] = time.time()
        record["seconds_to_first_step"] = round(record["resumed_unix"] - record["detected_unix"], 3)
        self.failures.append(record)
        self.trainer.record_failure(record)


def _checkpoint_fraction(plan: RestorePlan, infos, trainer) -> float:
    """The share of the model's embedding rows (elements) that went back to
    the checkpoint: the shards of grid positions with no live copy."""
    if plan.source is None:
        return 1.0
    if not plan.from_checkpoint:
        return 0.0
    dmp = trainer.sharded
    grid = dmp.process_groups.grid
    lost_positions = {next(g.index(r) for g in grid.sharding_groups if r in g) for r in plan.from_checkpoint}
    total = lost = 0
    for sharded in dmp.sharded.values():
        for table, shards in sharded.layout.shards.items():
            for shard in shards:
                elements = shard.num_rows * shard.num_cols
                total += elements
                if shard.rank in lost_positions:
                    lost += elements
    return lost / total if total else 0.0


def _broadcast_dense(trainer, source: int) -> None:
    """The dense layers, their buffers and the dense optimizer's state, from ``source``."""
    from dist_rec.checkpoint import dense_state_dict

    dmp = trainer.sharded
    with torch.no_grad():
        for name, tensor in sorted(dense_state_dict(dmp).items()):
            dist.broadcast(tensor, src=source)
    optimizer = trainer.dense_optimizer
    box = [optimizer.state_dict() if dist.get_rank() == source else None]
    dist.broadcast_object_list(box, src=source)
    if dist.get_rank() != source:
        optimizer.load_state_dict(box[0])
