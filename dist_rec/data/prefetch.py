"""Batches prepared ahead of the training step, by a worker process
(``BatchWorker``) or a thread (``Prefetcher``).

Parsing or generating a batch costs a few ms per thousand samples. Done by
the training thread, that time adds to every step; done ahead, it can hide
in the time the step waits (for its peers' collectives, for a GPU).

A thread shares the trainer's GIL: a reader that spends its time in
Python (the schema readers' text parsing) holds it while the step's many
small torch calls wait to take it back, and the thread competes for the
cores at the training's priority. A worker process (``BatchWorker``) does
not: it runs at idle priority (``SCHED_IDLE``, only on a core nothing else
wants), and batches cross in shared memory, one copy on this side. Measured
(``benchmarks/bench_data.py``, 2 cores): with a core free, the process
hides 28-39% of the schema readers' time where a thread hides none, and a
thread hides 45-50% of binary reads, which are numpy slicing and cost less
than a hand-over between processes; on the main job, whose 2 processes
keep both cores busy, the worker process is the only one faster than
reading inline. ``data.prefetch_worker: auto`` takes a thread for binary
data and the process for the rest.

Either way an error in the worker is raised in the training thread at the
batch where it happened, after the batches before it, with its type and
message (which names the file and line); a worker that dies is reported,
never waited for.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import os
import queue
import tempfile
import threading
from typing import Iterator, Optional, TypeVar

import numpy as np
import torch

T = TypeVar("T")

_DONE = object()


class Prefetcher(Iterator[T]):
    """Iterates ``source`` in a daemon thread, ``depth`` items ahead.

    ``close()`` (or the end of the source) stops the thread; a consumer
    that stops early must call it, or the thread stays blocked on a full
    queue until the process ends.
    """

    def __init__(self, source: Iterator[T], depth: int = 2, name: str = "dist_rec-prefetch") -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"Invalid depth={depth!r}. Must be an int >= 1.")
        self._source = source
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._finished = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as error:  # noqa: BLE001 -- handed to the consumer, raised there
            self._error = error
        self._put(_DONE)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._finished = True
            self._thread.join()
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stops the worker (it finishes the item in hand) and drops what it prepared."""
        self._stop.set()
        self._finished = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
        close = getattr(self._source, "close", None)
        if close is not None and not self._thread.is_alive():
            close()




class BatchWorker:
    """A worker process that makes this process's training batches, forked
    once, before the model exists, and then asked for streams.

    Forked early because a fork shares memory copy-on-write: forked from a
    trainer holding its tables, every page the trainer then updates would be
    copied, up to twice the model in memory. Forked while the process holds
    the datasets but no model, it costs the datasets' pages only.

    ``start(...)`` asks it for ``EpochStream(dataset, ...)`` from a step
    (after a resume or a recovery, with the reader's seek notes) and
    returns an iterator over the batches; a new ``start`` abandons the
    previous stream. Batches come ``depth`` ahead through ``depth + 1``
    shared-memory slots (one copy on this side; a batch larger than a slot
    comes through the pipe). The worker runs at idle priority with one
    torch thread and dies with this process (``PR_SET_PDEATHSIG``: create it
    from the thread that lives as long as the trainer). After each batch the reader's
    state (skip counts, seek notes, the epoch) comes back and is applied
    here by ``on_state``.
    """

    def __init__(self, dataset, depth: int = 2, on_state=None, slot_bytes: int = 4 << 20) -> None:
        import multiprocessing as mp
        from multiprocessing import shared_memory

        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"Invalid depth={depth!r}. Must be an int >= 1.")
        self.dataset = dataset  # the one it reads (as it was when forked)
        self._on_state = on_state
        self._slots = [shared_memory.SharedMemory(create=True, size=slot_bytes) for _ in range(depth + 1)]
        self._last_words = tempfile.TemporaryFile()  # where the worker's fault handler writes if it crashes
        context = mp.get_context("fork")
        self._messages, worker_messages = context.Pipe(duplex=False)
        worker_commands, self._commands = context.Pipe(duplex=False)
        free_end, self._free = context.Pipe(duplex=False)
        for slot in range(len(self._slots)):
            self._free.send(slot)
        self._process = context.Process(
            target=_serve, name="dist_rec-data-worker", daemon=True,
            args=(dataset, worker_commands, worker_messages, free_end, [m.name for m in self._slots], os.getpid(),
                  self._last_words.fileno()),
        )  # fmt: skip
        with _frozen_garbage():
            self._process.start()
        for end in (worker_messages, worker_commands, free_end):
            end.close()
        self._generation = 0
        self._closed = False

    def start(self, epochs: int, batch_size: int, rank: int, world_size: int, start_step: int = 0, seek=None) -> "_Batches":
        """This rank's batches over ``epochs`` passes from global batch
        ``start_step`` on (``seek``: the reader's seek notes to resume with)."""
        self._generation += 1
        try:
            self._commands.send((self._generation, (epochs, batch_size, rank, world_size, start_step, seek)))
        except (BrokenPipeError, OSError):
            raise RuntimeError(f"The data worker process (pid {self._process.pid}) is gone ({self._gone()}).") from None
        return _Batches(self, self._generation)

    def _receive(self, generation: int):
        """The next message of stream ``generation`` (older streams' batches are dropped)."""
        while True:
            try:
                while not self._messages.poll(1.0):
                    if not self._process.is_alive():
                        raise EOFError
                kind, number, payload, state = self._messages.recv()
            except (EOFError, OSError):  # the worker is gone (its end of the pipe closed with it)
                raise RuntimeError(f"The data worker process (pid {self._process.pid}) died ({self._gone()}) before "
                                   "handing over its next batch.") from None  # fmt: skip
            if kind == "batch" and payload[0] is not None and number != generation:
                self._release(payload[0])
            if number == generation:
                return kind, payload, state

    def _gone(self) -> str:
        """Closes this side of a worker that died, and says why it died as far
        as known: its exit code, the signal's usual cause, and the end of
        what its fault handler wrote (the Python stack at a crash)."""
        self._process.join(timeout=5)
        code = self._process.exitcode
        words = ""
        if not self._closed:
            self._last_words.seek(0)
            words = self._last_words.read(16384).decode(errors="replace")
            served = words.find(" in _serve\n")  # the frames below it are the trainer's, copied by the fork
            words = words[: served + len(" in _serve")] if served >= 0 else words.split("\nExtension modules:")[0]
        self.close()
        said = f"exit code {code}{_exit_hint(code)}"
        return f"{said}; its fault handler wrote:\n{words.strip()[:4000]}\n" if words.strip() else said

    def _release(self, slot: int) -> None:
        try:
            self._free.send(slot)
        except (BrokenPipeError, OSError):  # the worker has left
            pass

    def _unpack(self, payload):
        from dist_rec.data.batch import Batch
        from dist_rec.sparse.jagged_tensor import KeyedJaggedTensor

        slot, arrays, keys, stride = payload
        if slot is None:  # too large for a slot: the arrays came through the pipe
            tensors = [None if a is None else torch.from_numpy(a) for a in arrays]
        else:
            buffer = self._slots[slot].buf
            tensors = [torch.from_numpy(np.frombuffer(buffer, dtype, count, offset).reshape(shape).copy())
                       if dtype is not None else None for dtype, count, offset, shape in arrays]  # fmt: skip
            self._release(slot)
        dense, labels, values, lengths, weights = tensors
        return Batch(dense, KeyedJaggedTensor(keys, values, lengths=lengths, weights=weights, stride=stride), labels)

    def close(self) -> None:
        """Stops the worker and frees the shared memory."""
        if self._closed:
            return
        self._closed = True
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=10)
        for end in (self._messages, self._commands, self._free):
            end.close()
        self._last_words.close()
        for memory in self._slots:
            memory.close()
            try:
                memory.unlink()
            except FileNotFoundError:
                pass

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


class _Batches(Iterator):
    """One stream asked of a ``BatchWorker``."""

    def __init__(self, worker: BatchWorker, generation: int) -> None:
        self._worker, self._generation, self._finished = worker, generation, False

    def __next__(self):
        if self._finished:
            raise StopIteration
        if self._worker._closed:
            raise RuntimeError("The data worker process was closed; this stream has no more batches.")
        kind, payload, state = self._worker._receive(self._generation)
        batch = self._worker._unpack(payload) if kind == "batch" else None  # its slot is free again first
        if self._worker._on_state is not None and state is not None:
            self._worker._on_state(state)
        if batch is not None:
            return batch
        self._finished = True
        if kind == "error":
            raise payload
        raise StopIteration

    def close(self) -> None:
        """Stops reading this stream (the worker drops it at the next ``start``)."""
        self._finished = True


def _serve(dataset, commands, messages, free, slot_names, parent: int, last_words: int) -> None:
    """The worker: waits for a stream to make, makes it, and so on, until
    the trainer closes its ends of the pipes. Any error of a stream (its
    setup included) is sent to the trainer, never mistaken for the pipes'."""
    from multiprocessing import shared_memory

    from dist_rec.data.epochs import EpochStream

    _die_with_parent(parent)
    faulthandler.enable(os.fdopen(last_words, "w", closefd=False), all_threads=True)
    gc.enable()  # (disabled across the fork:) collects only what this process makes from here on
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    torch.set_num_threads(1)
    reader = getattr(dataset, "dataset", dataset)  # under a held-out split: the file reader
    pending = None
    try:
        slots = [shared_memory.SharedMemory(name=name) for name in slot_names]
        while True:
            command = pending if pending is not None else commands.recv()
            pending = None
            generation, (epochs, batch_size, rank, world_size, start_step, seek) = command
            stream, noted = None, [0]
            try:
                if seek and hasattr(reader, "restore_seek_state"):
                    reader.restore_seek_state(seek)
                stream = EpochStream(dataset, epochs, batch_size, rank, world_size, start_step)
                iterator = iter(stream)
                while True:
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        message = ("end", generation, None, _state(stream, reader, noted))
                        break
                    if commands.poll():  # a new stream was asked for: this one is abandoned
                        pending, message = _recv(commands), None
                        break
                    payload = _pack(batch, slots, free)
                    state = _state(stream, reader, noted)
                    try:
                        messages.send(("batch", generation, payload, state))
                    except (BrokenPipeError, OSError):
                        raise _PipeClosed from None
            except _PipeClosed:
                raise
            except BaseException as error:  # noqa: BLE001 -- raised in the trainer, where the batch was wanted
                state = _state(stream, reader, noted) if stream is not None else None
                message = ("error", generation, error, state)
            if message is not None:
                try:
                    messages.send(message)
                except (BrokenPipeError, EOFError, OSError):
                    raise
                except Exception:  # an exception that does not pickle: its type's name and message
                    error = message[2]
                    messages.send(("error", generation, RuntimeError(f"{type(error).__name__}: {error}"), None))
    except (_PipeClosed, BrokenPipeError, EOFError, OSError):
        pass  # the trainer closed its ends (or is gone): done
    finally:
        os._exit(0)  # no interpreter teardown: the parent's state (groups, threads) is not ours to close


class _PipeClosed(Exception):
    """The trainer's end of a pipe is gone (raised in the worker only)."""


def _recv(connection):
    try:
        return connection.recv()
    except (EOFError, OSError):
        raise _PipeClosed from None


def _state(stream, reader, noted) -> dict:
    """What the trainer reads back after each batch: where the epochs stand,
    the reader's skip counts, and its seek notes when they grew."""
    state = {"epoch": stream.epoch, "steps_per_epoch": stream.steps_per_epoch, "exhausted": stream.exhausted,
             "skips": getattr(reader, "skips", None)}  # fmt: skip
    if hasattr(reader, "seek_state"):
        seek = reader.seek_state()
        if len(seek) != noted[0]:
            state["seek"], noted[0] = seek, len(seek)
    return state


def _pack(batch, slots, free):
    kjt = batch.sparse_features
    weights = kjt.weights_or_none()
    arrays = [batch.dense_features, batch.labels, kjt.values(), kjt.lengths(), weights]
    arrays = [None if a is None else a.detach().cpu().numpy() for a in arrays]
    size = sum(-(-a.nbytes // 64) * 64 for a in arrays if a is not None)
    keys, stride = list(kjt.keys()), kjt.stride()
    if size > slots[0].size:
        return None, arrays, keys, stride
    slot = _recv(free)
    buffer = slots[slot].buf
    layout, offset = [], 0
    for a in arrays:
        if a is None:
            layout.append((None, 0, 0, None))
            continue
        flat = np.ascontiguousarray(a).reshape(-1)
        buffer[offset : offset + a.nbytes] = flat.view(np.uint8)
        layout.append((a.dtype.str, flat.size, offset, a.shape))
        offset += -(-a.nbytes // 64) * 64  # 64-byte aligned
    return slot, layout, keys, stride


@contextlib.contextmanager
def _frozen_garbage():
    """Forks with every object of this process in the collector's permanent
    generation, so that the worker's collector never finalises them.

    The trainer's garbage (a process group of an earlier run, a thread
    pool) would otherwise be collected in the worker, whose copy of it has
    no threads: its finaliser joins threads that are not there and the
    worker hangs or dies (SIGSEGV, seen once in CI after the whole suite).
    Freezing also spares the worker a collector pass over, and so a
    copy-on-write of, every page of the trainer's objects.
    """
    enabled = gc.isenabled()
    gc.disable()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def _exit_hint(code) -> str:
    if code == -7:  # SIGBUS: a shared-memory page that could not be backed
        return " (SIGBUS: /dev/shm is likely full; give it more room, or set data.prefetch_worker=thread)"
    return ""


def _die_with_parent(parent: int) -> None:
    """The worker gets SIGKILL when the trainer dies (Linux), even by SIGKILL."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)
