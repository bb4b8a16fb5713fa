"""Replica synchronisation off the training thread (ShadowSync), and the
same rules in the foreground for comparison.

``ShadowSync`` runs rounds in a background thread, one after another, on a
process group of its own (so its collectives never interleave with the
training thread's): each round copies this replica's parameters, computes
the rule's target from every replica's copy (``rules.py``) and adds
``target - copy`` to the live parameters. The training thread never waits
for a round; what it changed meanwhile stays (the consistency rule: a
round moves the parameters by the rule's correction of the copy, it never
overwrites them). With the trainer paused a round is exactly the
foreground rule.

The copy and the add hold ``lock``, as do the trainer's optimizer step
(``guard``) and a checkpoint's snapshot (``quiesced``): no update is torn.

Stopping is agreed, not assumed: every round's first sum carries a flag,
set on the replicas whose trainer asked to stop, and every replica leaves
after the round in which any replica set it. No replica is left waiting in
a collective that the others will not join.

A round's add goes around autograd's version counters (``.data``): a
forward in flight keeps its saved weights and its backward sees the moved
ones, the asynchrony ShadowSync accepts; the optimizer step never
interleaves with an add.

A thread, not a helper process: the copy, the sums and the add are torch
ops and gloo collectives that release the GIL, and the rounds work on the
parameters in place (a process would need them in shared memory and a
second copy of every parameter).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from dist_rec.sharding.comm import COMM_STATS


class _Rounds:
    """The flat copy and the apply shared by both modes."""

    def __init__(self, tensors: Sequence[torch.Tensor], rule, group: Callable[[], Optional[dist.ProcessGroup]], kind: str) -> None:
        self.tensors: List[torch.Tensor] = [t for t in tensors]
        if not self.tensors:
            raise ValueError("Replica sync needs at least one parameter to synchronise.")
        dtypes = {t.dtype for t in self.tensors}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"Replica sync needs floating parameters of one dtype; got {sorted(map(str, dtypes))}.")
        self.rule, self.group, self.kind = rule, group, kind
        self.sizes = [t.numel() for t in self.tensors]
        self.rounds = 0
        self.lock = threading.Lock()

    def copy(self) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in self.tensors])

    def add(self, delta: torch.Tensor) -> None:
        # Through ``.data``: a forward in flight keeps the weights it saved for
        # its backward (autograd's version check would otherwise fail that
        # backward); the backward then sees the moved weights, as a lock-free
        # (Hogwild) update would. Only the optimizer step is held off (``lock``).
        for tensor, part in zip(self.tensors, torch.split(delta, self.sizes)):
            tensor.data.add_(part.view_as(tensor))

    def write(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for tensor, part in zip(self.tensors, torch.split(flat, self.sizes)):
                tensor.copy_(part.view_as(tensor))

    def summer(self, group, flag: Optional[float] = None):
        """``all_reduce_sum`` for one round; with ``flag`` its first sum
        carries it, and ``.flags`` holds the replicas' total after."""
        size = dist.get_world_size(group)

        def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
            carry = all_reduce_sum.flags is None and flag is not None
            wire = torch.cat([x, x.new_tensor([flag])]) if carry else x.clone()
            dist.all_reduce(wire, group=group)
            COMM_STATS.record(self.kind, 2 * (size - 1) * wire.numel() * wire.element_size() // max(size, 1))
            if carry:
                all_reduce_sum.flags = float(wire[-1])
                return wire[:-1]
            return wire

        all_reduce_sum.flags = None
        return all_reduce_sum


class ShadowSync:
    """Background rounds of ``rule`` over ``tensors`` (this replica's live
    parameters, updated in place) on ``group()`` (asked at the start).

    Args:
        tensors: the parameters (one floating dtype).
        rule: a ``rules`` object (``target(x, all_reduce_sum)``).
        group: returns the replicas' process group (its own, not the
            training thread's).
        interval_s: pause between rounds (0: back to back, as fast as the
            link allows).
        kind: the name its traffic is counted under (``COMM_STATS``).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], rule, group: Callable[[], Optional[dist.ProcessGroup]],
                 interval_s: float = 0.0, kind: str = "shadow_sync") -> None:  # fmt: skip
        self._rounds = _Rounds(tensors, rule, group, kind)
        self.lock = self._rounds.lock
        self.interval_s = float(interval_s)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.round_seconds = 0.0
        # Test seam: ``between(round, copy)`` runs between a round's copy and its add.
        self.between: Optional[Callable[[int, torch.Tensor], None]] = None

    @property
    def rounds(self) -> int:
        return self._rounds.rounds

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            raise RuntimeError("ShadowSync is already running.")
        self._stop.clear()
        self.error = None
        group = self._rounds.group()
        self._thread = threading.Thread(target=self._run, args=(group,), name="dist_rec-shadow-sync", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: Optional[float] = None) -> None:
        """Asks every replica to stop after the next round, and waits for it
        (raises the thread's error, if it failed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"ShadowSync did not stop within {timeout_s} s (a replica is not running rounds).")
            self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def guard(self, step: Callable[[], object]) -> Callable[[], object]:
        """``step`` (the optimizer's) run under the lock: a round never copies
        or adds in the middle of it."""

        def guarded():
            with self.lock:
                return step()

        return guarded

    @contextlib.contextmanager
    def quiesced(self):
        """No round copies or adds meanwhile (a checkpoint's snapshot, an evaluation)."""
        with self.lock:
            yield

    def run_round(self, group) -> bool:
        """One round; False when a replica asked to stop (every replica then
        leaves after this same round)."""
        rounds = self._rounds
        started = time.perf_counter()
        with self.lock:
            copy = rounds.copy()
        if self.between is not None:
            self.between(rounds.rounds, copy)
        summer = rounds.summer(group, flag=1.0 if self._stop.is_set() else 0.0)
        target = rounds.rule.target(copy, summer)
        delta = target - copy
        with self.lock:
            rounds.add(delta)
        rounds.rounds += 1
        self.round_seconds += time.perf_counter() - started
        return not summer.flags

    def _run(self, group) -> None:
        try:
            while self.run_round(group):
                if self.interval_s > 0:
                    self._stop.wait(self.interval_s)
        except BaseException as error:  # handed to the training thread by stop()
            self.error = error


class ForegroundSync:
    """The same rules in the foreground: every ``every`` optimizer steps,
    on the training thread, the parameters are replaced by the rule's
    target (ShadowSync's comparison, and what 2D sync did so far)."""

    def __init__(self, tensors: Sequence[torch.Tensor], rule, group: Callable[[], Optional[dist.ProcessGroup]],
                 every: int = 1, kind: str = "foreground_sync") -> None:  # fmt: skip
        if every < 1:
            raise ValueError(f"Invalid sync.every={every}. Must be >= 1.")
        self._rounds = _Rounds(tensors, rule, group, kind)
        self.every = int(every)
        self._steps = 0
        self.round_seconds = 0.0

    @property
    def rounds(self) -> int:
        return self._rounds.rounds

    def after_optimizer_step(self) -> None:
        self._steps += 1
        if self._steps % self.every:
            return
        started = time.perf_counter()
        rounds = self._rounds
        copy = rounds.copy()
        rounds.write(rounds.rule.target(copy, rounds.summer(rounds.group())))
        rounds.rounds += 1
        self.round_seconds += time.perf_counter() - started
