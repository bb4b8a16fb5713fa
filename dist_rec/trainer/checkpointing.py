"""The trainer's checkpointer: when to save, what, and in the background.

``Checkpointer`` keeps a series of checkpoints in ``train.checkpoint_dir``
(``dist_rec.checkpoint.series``): it checks the directory and takes its
lock when the run starts, resumes from the newest restorable entry, and at
each save

1. waits for the previous save's writer if it is still running (at most one
   save in flight; the wait counts as stall),
2. takes a snapshot on the training thread (``checkpoint.snapshot``: every
   row for a base; for a delta the rows the policy selects),
3. hands it to the background writer (``checkpoint.writer``), which writes,
   checks for NaN / inf, agrees with the other ranks and publishes the
   entry, then prunes to ``keep_last``; training goes on meanwhile.

A writer's failure reaches the training thread at its next step: a save
refused for NaN / inf stops the run (the last good checkpoint stays; the
next save would only replace good state with bad); another failure is
reported and the next save is a full base. With ``checkpoint.auto_interval``
the interval follows ``dist_rec.checkpoint.interval`` from ``fault.mtbf_s``
(or the failures seen) and the measured save cost.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from dist_rec.checkpoint import CheckpointError, load_checkpoint
from dist_rec.checkpoint.checkpoint import NonFiniteError, manifest_header
from dist_rec.checkpoint.interval import IntervalChoice, choose_interval
from dist_rec.checkpoint.series import CheckpointSeries, entry_name
from dist_rec.checkpoint.snapshot import SavePolicy, SnapshotBuffers, attach_trackers, take_snapshot
from dist_rec.checkpoint.writer import BackgroundWriter, write_entry
from dist_rec.config import ConfigError
from dist_rec.fault.activity import ACTIVITY

Say = Callable[..., None]


class Checkpointer:
    """Checkpoints of ``model`` in the series at ``directory`` (see the module docstring).

    Args:
        directory (Path): the series' root (``train.checkpoint_dir``).
        every (int): save every this many steps (0: only at the end), unless
            the interval is chosen automatically.
        total_steps (int): the run's steps (the last one is saved by the loop).
        model: the ``DistributedModelParallel``.
        dense_optimizer: saved with the dense layers.
        data: where the data stream stands (``position(step)``, ``seek(extra, directory)``).
        say: the main rank's printer.
        at: the failure injector's hook (``at("checkpoint", step)`` while files are written).
        config (CheckpointConfig): policy, background writes, bases, keep_last, interval.
        group: the process group the writer's collectives use (its own), or
            a callable returning it (the group as re-formed by the latest
            recovery).
        lock (bool): take the directory's lock (the job's first rank).
        mtbf_s (float): the expected seconds between failures (0: unknown).
        partial (bool): failures are recovered partially (the fault-tolerant launcher).
        num_shards (int): embedding shards (a sharding group's ranks), for the PLS rule.
    """

    def __init__(self, directory: Path, every: int, total_steps: int, model, dense_optimizer, data, say: Say,
                 at: Callable[[str, int], None] = lambda place, step: None, config=None, group=None, lock: bool = False,
                 mtbf_s: float = 0.0, partial: bool = False, num_shards: int = 1) -> None:  # fmt: skip
        from dist_rec.config import CheckpointConfig

        self.directory, self.every, self.total_steps = Path(directory), every, total_steps
        self.model, self.dense_optimizer, self.data, self.say, self.at = model, dense_optimizer, data, say, at
        self.config = config or CheckpointConfig()
        self.group = group
        self.series = CheckpointSeries(self.directory)
        try:
            self.series.check()
            if lock:
                self.series.lock()
        except CheckpointError as error:
            raise ConfigError(f"Invalid train.checkpoint_dir={str(self.directory)!r}. {error}") from None
        self.policy = SavePolicy(self.config.policy, self.config.base_every, self.config.mfu_fraction,
                                 self.config.ssu_fraction, delta_bits=self.config.delta_bits)  # fmt: skip
        attach_trackers(model, self.policy)
        self.writer = BackgroundWriter()
        self.buffers = SnapshotBuffers()
        self._buffers_ready: Optional[threading.Thread] = None
        if self.config.async_save:  # the snapshot's host buffers mapped off the training thread, before the first save
            self._buffers_ready = threading.Thread(target=self.buffers.prepare, args=(model,), name="dist_rec-checkpoint-buffers",
                                                   daemon=True)  # fmt: skip
            self._buffers_ready.start()
        self._parent: Optional[str] = None  # the newest entry a delta may follow
        self._since_base = 0
        self._pending: Optional[Dict] = None  # the save in flight
        self.saves: List[Dict] = []  # per save: step, kind, stall seconds, bytes, write seconds
        self.mtbf_s, self.partial, self.num_shards = mtbf_s, partial, num_shards
        self.interval: Optional[IntervalChoice] = None
        self._last_save_step, self._started = 0, time.perf_counter()

    # -- when -------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        self.poll()
        if step == self.total_steps:
            return False
        if self.interval is not None:
            return step - self._last_save_step >= self.interval.steps
        if self.config.auto_interval and not self.saves and self.every == 0:  # a first save to measure the cost by
            return step == max(1, min(100, self.total_steps // 10))
        return bool(self.every) and step % self.every == 0

    def choose_interval(self, step_seconds: float, failures_seen: int = 0, seconds_run: float = 0.0) -> None:
        """With ``auto_interval``, after a save: the interval from the MTBF
        (configured, or measured from the failures seen) and the save cost
        measured so far (the stall of background saves)."""
        if not self.config.auto_interval or not self.saves:
            return
        mtbf = self.mtbf_s or (seconds_run / failures_seen if failures_seen else 0.0)
        if mtbf <= 0:
            if self.interval is None:
                self.say("checkpoint.auto_interval: no fault.mtbf_s and no failure seen yet; keeping "
                         f"train.checkpoint_every={self.every}")  # fmt: skip
            return
        recent = self.saves[-5:]
        cost = sum(s["stall_s"] - s["waited_s"] for s in recent) / len(recent)  # the snapshot, not a wait for a write
        written = [s["write_s"] for s in recent if "write_s" in s]
        write = sum(written) / len(written) if written and self.config.async_save else 0.0
        choice = choose_interval(cost, mtbf, step_seconds, self.partial, self.config.target_pls, self.num_shards,
                                 write_s=write)  # fmt: skip
        if self.interval is None or choice.steps != self.interval.steps:
            self.say(choice.describe())
        self.interval = choice

    # -- saving ----------------------------------------------------------------------

    def save(self, step: int) -> Optional[Path]:
        """Snapshots ``step`` and starts writing it (or writes it, without
        ``async_save``). Returns the entry's path."""
        started = time.perf_counter()
        waited = self._finish_pending()
        kind = "base"
        if self.policy.tracks and self._parent is not None and self._since_base + 1 < self.policy.base_every:
            kind = "delta"
        if self._buffers_ready is not None:  # (a save before the buffers are mapped waits for them)
            self._buffers_ready.join()
            self._buffers_ready = None
        ACTIVITY.set(f"checkpoint of step {step}: snapshot ({kind})")
        snapshot = take_snapshot(self.model, self.dense_optimizer, step, self.data.position(step), kind, self.policy,
                                 copy=self.config.async_save, buffers=self.buffers)  # fmt: skip
        header = manifest_header(self.model, self.dense_optimizer, step, kind, self._parent if kind == "delta" else None)
        keep = self.config.keep_last
        group = self.group() if callable(self.group) else self.group  # the groups of this epoch

        def write() -> Path:
            from dist_rec.checkpoint import checkpoint as checkpoint_module

            checkpoint_module._fault_hook = lambda stage, path: self.at("checkpoint", step) if stage == "file_written" else None
            try:
                written = write_entry(self.directory, snapshot, header, group, keep, cancel=self.writer.cancel)
                record["bytes"] = snapshot.nbytes  # as written (a delta is encoded by the writer)
                return written
            finally:
                checkpoint_module._fault_hook = None

        record = {"step": step, "kind": kind, "bytes": snapshot.nbytes, "rows_saved": snapshot.rows_saved,
                  "rows_total": snapshot.rows_total, "waited_s": waited}  # fmt: skip
        if self.config.async_save:
            self._pending = record
            self.writer.start(write)
            record["stall_s"] = time.perf_counter() - started
        else:
            ACTIVITY.set(f"checkpoint of step {step}: writing")
            try:
                write()
            except BaseException:  # the saver's reference and the rows' bits moved: the next save is a base
                self._parent, self._since_base = None, 0
                raise
            record["stall_s"] = time.perf_counter() - started
            record["write_s"] = record["stall_s"]
            self._published(record)
        self._parent = entry_name(step)
        self._since_base = 0 if kind == "base" else self._since_base + 1
        self._last_save_step = step
        self.saves.append(record)
        return self.directory / entry_name(step)

    def poll(self) -> None:
        """Collects a finished background write (raises its refusal)."""
        if self._pending is not None and self.writer.done():
            self._finish_pending()

    def _finish_pending(self) -> float:
        """Waits for the save in flight; returns the seconds waited."""
        if self._pending is None:
            return 0.0
        started = time.perf_counter()
        record, self._pending = self._pending, None
        try:
            self.writer.wait()
        except NonFiniteError:
            self._parent = None
            raise
        except Exception as error:  # a failed write: the last good entry stays; the next save is a base
            self._parent = None
            self.say(f"checkpoint of step {record['step']} failed: {type(error).__name__}: {error}")
            return time.perf_counter() - started
        record["write_s"] = self.writer.seconds
        self._published(record)
        return time.perf_counter() - started

    def _published(self, record: Dict) -> None:
        self.say(
            f"checkpoint @ step {record['step']} ({record['kind']}, {record['rows_saved']:,} of {record['rows_total']:,} "
            f"rows, {record['bytes'] / 2**20:.1f} MiB): {self.directory} (stalled {record['stall_s']:.2f} s, written in "
            f"{record.get('write_s', 0.0):.1f} s)"
        )

    def finish(self) -> None:
        """Waits for the save in flight (the end of a run)."""
        self._finish_pending()

    def abandon(self, cancel: bool = False) -> None:
        """After a failure: waits for the writer (it fails with the groups;
        with ``cancel`` it stops writing at once: a dead rank's part of the
        entry is lost anyway) and makes the next save a base, since a
        delta's parent may not have been published."""
        if cancel:
            self.writer.cancel.set()
        try:
            self.writer.wait()
        except Exception:
            pass
        self._pending, self._parent, self._since_base = None, None, 0

    def close(self) -> None:
        """The end of the run (or its failure): the writer's thread ends (a
        write still in flight is not waited for), the directory's lock is released."""
        self.writer.close()
        self._pending = None
        self.series.unlock()

    # -- resuming --------------------------------------------------------------------

    def resume(self) -> int:
        """Loads the newest restorable checkpoint (base and deltas; resharding
        as needed), seeks the data stream to where it stood and continues the
        series after it. Returns the step to continue from (0 without one)."""
        from dist_rec.checkpoint import CheckpointReader

        if CheckpointReader.find(self.directory) is None:
            return 0
        ACTIVITY.set(f"loading the checkpoint in {self.directory}")
        info = load_checkpoint(self.directory, self.model, self.dense_optimizer,
                               check_extra=getattr(self.data, "check", None))  # fmt: skip
        step = self.data.seek(info["extra"], self.directory)
        last = Path(info["directory"])
        self._parent = last.name if last.parent == self.directory else None  # a legacy single checkpoint: next is a base
        self._since_base = len(info.get("chain", [])) - 1 if self._parent else 0
        if self.policy.quantises:  # a quantised delta follows this process's own reference: a base first
            self._parent, self._since_base = None, 0
        self._last_save_step = step
        self.say(f"resumed from {info['directory']}: step {info['step']}; continuing at step {step}")
        return step

    def resume_collective(self) -> int:
        """``resume`` for a job whose every process is new (all died):
        without a checkpoint the fresh state is agreed as at a start."""
        step = self.resume()
        if step == 0:
            self.model.broadcast_initial_state()
        return step

    def latest(self) -> Optional[Path]:
        chain = self.series.latest() if self.series.root.is_dir() else None
        return chain[-1] if chain else None


class NullCheckpointer:
    """No ``train.checkpoint_dir``: nothing is saved or resumed."""

    directory = None
    saves: List[Dict] = []

    def __init__(self, model=None) -> None:
        self.model = model

    def should_save(self, step: int) -> bool:
        return False

    def save(self, step: int) -> Optional[Path]:
        return None

    def poll(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def abandon(self, cancel: bool = False) -> None:
        pass

    def close(self) -> None:
        pass

    def choose_interval(self, *args, **kwargs) -> None:
        pass

    def resume(self) -> int:
        return 0

    def resume_collective(self) -> int:
        if self.model is not None:
            self.model.broadcast_initial_state()
        return 0

    def latest(self) -> Optional[Path]:
        return None


# -- settings that changed since the checkpoint ------------------------------------------

# What fixes the shapes of what a checkpoint holds, or the meaning of its
# optimizer state: a change cannot be applied to it.
FIXED_BY_CHECKPOINT = (
    "data.num_embeddings_per_feature", "data.num_dense_features", "data.sparse_feature_names",
    "model.embedding_dim", "model.dense_arch_layer_sizes", "model.over_arch_layer_sizes", "model.interaction",
    "model.dcn_num_layers", "model.dcn_low_rank", "optimizer.dense", "optimizer.sparse",
)  # fmt: skip
# What a resume never reports (where the run writes, how long it runs, how it logs).
NOT_COMPARED = ("train.output_dir", "train.checkpoint_dir", "train.steps", "train.log_every", "train.eval_every",
                "train.checkpoint_every", "fault.inject", "fault.event_log")  # fmt: skip


def _flatten(values: Dict, prefix: str = "") -> Dict[str, object]:
    flat: Dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def changed_settings(saved: Dict, current: Dict) -> Dict[str, tuple]:
    """``{"section.field": (saved, now)}`` for every compared setting that differs."""
    before, now = _flatten(saved), _flatten(current)
    return {
        name: (before[name], now.get(name))
        for name in sorted(before)
        if name in now and before[name] != now[name] and not _under(name, NOT_COMPARED)
    }


def _under(name: str, settings) -> bool:
    """``name`` is one of ``settings`` or inside one (``a.b`` is under ``a``, not ``a.bc``)."""
    return any(name == s or name.startswith(s + ".") for s in settings)


def reconcile_settings(saved: Optional[Dict], config, directory, say: Say) -> List[str]:
    """Compares the run's settings with those saved in the checkpoint:
    refuses a change to what the checkpoint's shapes or optimizer state
    depend on (``FIXED_BY_CHECKPOINT``), naming the setting; reports every
    other change as applied. Returns the names of the applied changes."""
    if not saved:
        return []
    changes = changed_settings(saved, config.to_dict())
    fixed = {name: values for name, values in changes.items() if _under(name, FIXED_BY_CHECKPOINT)}
    if fixed:
        listed = "; ".join(f"{name}: {a!r} in the checkpoint, {b!r} now" for name, (a, b) in fixed.items())
        raise ConfigError(f"Cannot resume from {directory}: {listed}. The checkpoint's tables and optimizer state "
                          "were saved under the first value; start a new train.checkpoint_dir to change it.")  # fmt: skip
    for name, (a, b) in changes.items():
        say(f"resume: {name} changed since the checkpoint: {a!r} -> {b!r} (applied)")
    return list(changes)
