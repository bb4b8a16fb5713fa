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

Stopping is agreed, not assumed: every round starts with a one-element
all-reduce of a flag, set on the replicas whose trainer asked to stop, and
every replica leaves when any replica set it. No replica is left waiting
in a collective that the others will not join.

Rounds are paced (``duty``): after a round busy for t seconds (counted
from that first all-reduce, so a pausing peer's wait does not feed the
next pause) the thread waits t (1 - duty) / duty.

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


class Rounds:
    """What a round moves, for both modes: every element of ``tensors``,
    as one flat copy (``embeddings.TouchedRows`` moves a chosen subset)."""

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

    def restart(self) -> None:
        """Rounds start (again): nothing to forget for whole copies."""

    def select(self, group) -> None:
        """What the next round moves: every element, for whole copies."""

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

    def summer(self, group):
        """``all_reduce_sum`` over ``group`` for one round (its traffic counted)."""
        size = dist.get_world_size(group)

        def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
            wire = x.clone()
            dist.all_reduce(wire, group=group)
            COMM_STATS.record(self.kind, 2 * (size - 1) * wire.numel() * wire.element_size() // max(size, 1))
            return wire

        return all_reduce_sum


class ShadowSync:
    """Background rounds of ``rule`` over ``tensors`` (this replica's live
    parameters, updated in place) on ``group()`` (asked at the start).

    Args:
        tensors: the parameters (one floating dtype), or a ``Rounds`` that
            says what a round moves (then ``rule`` and ``group`` are its).
        rule: a ``rules`` object (``target(x, all_reduce_sum)``).
        group: returns the replicas' process group (its own, not the
            training thread's).
        interval_s: least pause between rounds (0: back to back, as fast as
            the link allows).
        duty: the largest share of wall time in rounds (see ``pause_after``).
        kind: the name its traffic is counted under (``COMM_STATS``).
        min_steps: a round starts only once this many optimizer steps
            (``stepped``) were made since the last one started: BMUF's
            block, whose momentum is meant per block of steps. (Default: 1,
            rounds never wait for steps.)
    """

    def __init__(self, tensors, rule, group: Callable[[], Optional[dist.ProcessGroup]], interval_s: float = 0.0,
                 duty: float = 1.0, kind: str = "shadow_sync", min_steps: int = 1) -> None:  # fmt: skip
        if not 0.0 < duty <= 1.0:
            raise ValueError(f"Invalid sync.duty={duty}. Must be in (0, 1] (the share of time spent in rounds).")
        if interval_s < 0:
            raise ValueError(f"Invalid sync.interval_s={interval_s}. Must be >= 0.")
        if min_steps < 1:
            raise ValueError(f"Invalid sync.every={min_steps}. Must be >= 1.")
        self._rounds = tensors if isinstance(tensors, Rounds) else Rounds(tensors, rule, group, kind)
        self.lock = self._rounds.lock
        self.interval_s, self.duty, self.min_steps = float(interval_s), float(duty), int(min_steps)
        self._steps = self._round_steps = 0  # optimizer steps (``stepped``), and their count at the last round's start
        self._stepped = threading.Condition()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._generation = 0  # a round adds only if its thread is still the current one (``abandon``)
        self.error: Optional[BaseException] = None
        self.round_seconds = 0.0
        self.busy_s = 0.0  # the last round's seconds after the replicas met
        # Test seam: ``between(round, copy)`` runs between a round's copy and its add.
        self.between: Optional[Callable[[int, torch.Tensor], None]] = None

    @property
    def rounds(self) -> int:
        return self._rounds.rounds

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, rule=None) -> None:
        """Starts the rounds on ``group()`` (asked now: after a rebuild, the
        new group); ``rule`` replaces the rule (a new group size, fresh state)."""
        if self.running:
            raise RuntimeError("ShadowSync is already running.")
        if rule is not None:
            self._rounds.rule = rule
        self._stop.clear()
        self.error = None
        self._generation += 1
        group = self._rounds.group()
        self._rounds.restart()
        self._thread = threading.Thread(target=self._run, args=(group, self._generation), name="dist_rec-shadow-sync",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def stop(self, timeout_s: Optional[float] = None) -> None:
        """Asks every replica to stop (agreed at the start of the next round,
        whose work is then skipped everywhere) and waits for it (raises the
        thread's error, if it failed)."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"ShadowSync did not stop within {timeout_s} s (a replica is not running rounds).")
            self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def abandon(self, timeout_s: float = 10.0) -> bool:
        """After a failure (the groups aborted): the rounds end without an
        agreed stop, the thread's error (its failed collective) is dropped,
        and a round still in flight never adds. Returns whether the thread
        ended within ``timeout_s``."""
        with self.lock:
            self._generation += 1  # under the lock: no add of the old thread can follow
        self._stop.set()
        self._wake()
        ended = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            ended = not self._thread.is_alive()
            self._thread = None
        self.error = None
        return ended

    def stepped(self) -> None:
        """The trainer made an optimizer step (rounds wait for ``min_steps`` of them)."""
        with self._stepped:
            self._steps += 1
            self._stepped.notify_all()

    def _wake(self) -> None:
        with self._stepped:
            self._stepped.notify_all()

    def _wait_for_steps(self) -> None:
        """With ``min_steps`` > 1, a round starts once that many optimizer
        steps were made since the last one started (BMUF's block), or at a
        stop; with 1, rounds do not wait for steps."""
        if self.min_steps <= 1:
            return
        with self._stepped:
            self._stepped.wait_for(lambda: self._stop.is_set() or self._steps - self._round_steps >= self.min_steps)
            self._round_steps = self._steps

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

    def run_round(self, group, generation: Optional[int] = None, stop: bool = False) -> bool:
        """One round; False when a replica asked to ``stop`` (every replica
        then leaves before this round's work). Sets ``busy_s``: the round's
        seconds after the replicas met (a slow or pausing peer's wait is
        not counted: the pacing would otherwise feed on itself)."""
        rounds = self._rounds
        flag = torch.tensor([1.0 if stop else 0.0])
        dist.all_reduce(flag, group=group)  # the agreed stop; every replica is at this round's start after it
        if float(flag) > 0:
            return False
        started = time.perf_counter()
        rounds.select(group)
        with self.lock:
            copy = rounds.copy()
        if self.between is not None:
            self.between(rounds.rounds, copy)
        target = rounds.rule.target(copy, rounds.summer(group))
        delta = target - copy
        with self.lock:
            if generation is not None and generation != self._generation:
                return False  # abandoned meanwhile: the groups (and this round's sums) are gone
            rounds.add(delta)
        rounds.rounds += 1
        self.busy_s = time.perf_counter() - started
        self.round_seconds += self.busy_s
        return True

    def pause_after(self, seconds: float) -> float:
        """The pause after a round busy for ``seconds``: at least
        ``interval_s``, and long enough that rounds take at most ``duty``
        of the time (the rounds' copies and sums share the cores with the
        training)."""
        return max(self.interval_s, seconds * (1.0 - self.duty) / self.duty)

    def _run(self, group, generation: int) -> None:
        try:
            while True:
                self._wait_for_steps()
                if not self.run_round(group, generation, stop=self._stop.is_set()):
                    return
                pause = self.pause_after(self.busy_s)
                if pause > 0:
                    self._stop.wait(pause)
        except BaseException as error:  # handed to the training thread by stop()
            if generation == self._generation:
                self.error = error


class ForegroundSync:
    """The same rules in the foreground: every ``every`` optimizer steps,
    on the training thread, the parameters are replaced by the rule's
    target (ShadowSync's comparison, and what 2D sync did so far)."""

    def __init__(self, tensors: Sequence[torch.Tensor], rule, group: Callable[[], Optional[dist.ProcessGroup]],
                 every: int = 1, kind: str = "foreground_sync") -> None:  # fmt: skip
        if every < 1:
            raise ValueError(f"Invalid sync.every={every}. Must be >= 1.")
        self._rounds = Rounds(tensors, rule, group, kind)
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
