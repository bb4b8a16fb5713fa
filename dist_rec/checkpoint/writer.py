"""Persisting a snapshot as an entry of a checkpoint series, in the
background.

``write_entry`` is a collective over its own process group (the
checkpointer's, from the process-group owner), so that it can run in a
background thread while the training thread's collectives go on over the
other groups: every rank writes its files (fsynced, hashed, NaN and inf
refused) into ``<root>/step-N.tmp-<id>``, all ranks agree on the outcome,
rank 0 writes the manifest last and renames the directory into place, then
prunes the series to ``keep_last``. A failure anywhere leaves the entries
already published as they were.

``BackgroundWriter`` runs one write at a time in a thread; the training
thread only waits for it before the next save (at most one in flight) and
at the end, and learns its failure at its next step.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch.distributed as dist

from dist_rec.checkpoint.files import MANIFEST, TMP_MARK, CheckpointError, fsync_dir, fsync_tree, write_text_atomic
from dist_rec.checkpoint.series import CheckpointSeries, entry_name
from dist_rec.checkpoint.snapshot import Snapshot


def write_entry(root: Path, snapshot: Snapshot, header: Dict, group, keep_last: int = 0,
                cancel: Optional[threading.Event] = None) -> Path:  # fmt: skip
    """Writes ``snapshot`` as ``<root>/step-N`` (a collective over ``group``,
    every rank with its own snapshot and rank 0 with the manifest
    ``header``). Returns the entry's path. Raises ``CheckpointError`` (or
    ``NonFiniteError``) on every rank when any rank fails. A set ``cancel``
    stops this rank's file writes at the next 64 MiB (after a rank died the
    entry cannot be published: recovery need not wait for the bytes)."""
    from dist_rec.checkpoint.checkpoint import _agree_on, write_items

    rank = dist.get_rank(group)
    name = entry_name(snapshot.step)
    box = [None]
    if rank == 0:
        ident = uuid.uuid4().hex[:10]
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / f"{name}{TMP_MARK}{ident}").mkdir()
            box = [(ident, None)]
        except OSError as e:
            box = [(None, f"cannot create a directory in {root}: {e}")]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    ident, error = box[0]
    if error is not None:
        raise CheckpointError(f"checkpoint of step {snapshot.step} refused: {error}")
    tmp = root / f"{name}{TMP_MARK}{ident}"
    records, error = [], None
    try:
        records = write_items(tmp, snapshot.items, dist.get_rank(), check_finite=True, cancel=cancel)
    except Exception as e:  # told to every rank below
        error = e
    try:
        _agree_on(error, f"checkpoint of step {snapshot.step}", group)
    except CheckpointError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    gathered: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, records, group=group)
    status = None
    if rank == 0:
        try:
            files = sorted((r for part in gathered for r in part), key=lambda r: r["file"])
            write_text_atomic(tmp / MANIFEST, json.dumps(dict(header, files=files, created_unix=time.time()), indent=1) + "\n")
            fsync_tree(tmp)
            final = root / name
            if final.exists():  # a leftover of an earlier run at this step (e.g. before a recovery): replaced
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(root)
            if keep_last:
                CheckpointSeries(root).prune(keep_last)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            status = f"{type(e).__name__}: {e}"
    box = [status]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    if box[0] is not None:
        raise CheckpointError(f"checkpoint of step {snapshot.step} refused: rank 0: {box[0]}")
    return root / name


class _Job:
    """One write handed to the writer's thread, and what came of it."""

    def __init__(self, write: Callable[[], object]) -> None:
        self.write: Optional[Callable[[], object]] = write
        self.finished = threading.Event()
        self.result = None
        self.error: Optional[BaseException] = None
        self.seconds = 0.0


class BackgroundWriter:
    """One write at a time in a background thread (one thread for the
    writer's life: handing a write to a waiting thread costs the training
    thread a queue put, where starting a thread made it wait until the new
    thread ran, milliseconds on a busy machine)."""

    def __init__(self) -> None:
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._job: Optional[_Job] = None  # the write in flight, until wait()
        self.seconds = 0.0  # the last write's duration
        self.cancel = threading.Event()  # set: the write in flight stops at its next chunk (``write_entry``)

    @property
    def busy(self) -> bool:
        return self._job is not None and not self._job.finished.is_set()

    def start(self, write: Callable[[], object]) -> None:
        if self._job is not None:
            raise RuntimeError("BackgroundWriter: a write is already in flight; wait() for it first.")
        self.cancel.clear()
        self._job = _Job(write)
        if self._thread is None:
            self._thread = threading.Thread(target=_serve, args=(self._jobs,), name="dist_rec-checkpoint-writer", daemon=True)
            self._thread.start()
        self._jobs.put(self._job)

    def done(self) -> bool:
        """Whether a write was started and has finished (``wait`` then returns at once)."""
        return self._job is not None and self._job.finished.is_set()

    def wait(self):
        """The write's result once it finished (raises its error); None when
        none is in flight. A cancel applies to the write in flight only: it
        is cleared here."""
        job, self._job = self._job, None
        if job is None:
            self.cancel.clear()
            return None
        job.finished.wait()
        self.cancel.clear()
        self.seconds = job.seconds
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        """Ends the thread: at once when idle; after the write in flight
        otherwise, without waiting for it here (after a failure that write
        may be stuck in a collective with a dead peer until the group's
        timeout; the thread is a daemon). A later ``start`` makes a new thread."""
        if self._thread is None:
            return
        self._jobs.put(None)
        if not self.busy:
            self._thread.join()
        self._thread, self._jobs, self._job = None, queue.SimpleQueue(), None


def _serve(jobs: "queue.SimpleQueue") -> None:
    """The writer's thread: runs the jobs it is handed until told to stop (None)."""
    while True:
        job = jobs.get()
        if job is None:
            return
        started = time.perf_counter()
        try:
            job.result = job.write()
        except BaseException as error:  # handed to the training thread by wait()
            job.error = error
        job.write = None  # (the snapshot it holds is freed now, not at the next save)
        job.seconds = time.perf_counter() - started
        job.finished.set()
