"""The coordinator: decides every membership epoch of a fault-tolerant job.

It runs in the launcher of the job's first node (``launch.py``), next to
the store, and sees the job only through the store (``store.py``): the
workers' heartbeats and join records, the launchers' exit records, the
workers' failure reports. Each tick (0.1 s) it asks:

* Is a member of the running epoch dead? Its launcher saw it exit, a newer
  incarnation of its rank started, or its heartbeat has not changed for
  ``timeout_s`` (a hung process, a host cut off). Then the epoch is aborted
  (every member leaves its collectives at once), the dead incarnation is
  fenced (its launcher kills it if it still runs, and starts a
  replacement), and the next epoch is chosen: in 2D the whole sharding
  groups go on at once (``membership.degraded_epoch``); otherwise every
  rank waits until the replacements have joined (``membership.full_epoch``).
* Did a member report a failed collective while nobody is dead (a link that
  flapped)? After ``timeout_s`` every rank forms the next epoch again.
* Are the ranks left out of a degraded epoch all back (replacements ready,
  the broken groups' survivors waiting)? Then the full epoch is published
  as *pending*: the running members switch to it at their next step
  boundary, without aborting anything.

It gives up (``ft/failed``) after ``max_failures`` failures, or when the
ranks an epoch needs have not joined within ``join_timeout_s``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Set, Tuple

from dist_rec.fault import store as ft
from dist_rec.fault.membership import Epoch, JobShape, degraded_epoch, full_epoch

STARTING, RUNNING, AWAITING, FINISHED, FAILED = "starting", "running", "awaiting", "finished", "failed"


class Coordinator:
    """Publishes the epochs of one job (see the module docstring).

    Args:
        store: a client of the job's store.
        world_size (int): ranks of the job as launched.
        shape (Optional[JobShape]): its 2D grid; learnt from the workers'
            join records (their ``sharding.replicas`` and ``layout``) when None.
        timeout_s (Optional[float]): a heartbeat unchanged this long means
            a dead member; the workers' ``fault.timeout_s`` (from their join
            records) when None.
        join_timeout_s (float): how long an epoch may wait for its ranks.
        max_failures (int): failures survived before the job gives up.
        log (Callable[[str], None]): where decisions are told.
    """

    def __init__(
        self,
        store,
        world_size: int,
        shape: Optional[JobShape] = None,
        timeout_s: Optional[float] = None,
        join_timeout_s: float = 600.0,
        max_failures: int = 10,
        log: Callable[[str], None] = print,
    ) -> None:
        self.store, self.world_size, self.shape = store, int(world_size), shape
        self._fixed_timeout = timeout_s is not None
        self.timeout_s = float(timeout_s) if timeout_s is not None else 60.0
        self.join_timeout_s, self.max_failures = float(join_timeout_s), int(max_failures)
        self.log = log
        self.running: Optional[Epoch] = None  # the epoch training now (formed)
        self.pending: Optional[Epoch] = None  # published, not formed yet (its members are arriving)
        self.latest_id = -1
        self.phase = STARTING
        self.failures = 0
        self.history: List[Dict] = []  # one record per failure survived
        self._current: List[int] = []  # ranks whose state is current (the last running epoch's live members)
        self._heartbeats: Dict[int, Tuple[Optional[str], float]] = {}
        self._dead: Dict[int, Set[int]] = defaultdict(set)  # rank -> dead incarnations
        self._done: Set[int] = set()
        self._waiting_since = time.monotonic()
        self._report_since: Optional[float] = None
        self._stop = threading.Event()

    # -- the loop ------------------------------------------------------------------

    def run(self, interval: float = 0.1) -> None:
        """Ticks until the job finishes or fails (call in a thread)."""
        while not self._stop.is_set() and self.phase not in (FINISHED, FAILED):
            try:
                self.tick(time.monotonic())
            except Exception as error:  # the store went away: the launcher is ending
                if self._stop.is_set():
                    return
                self.log(f"coordinator: {type(error).__name__}: {error}")
                time.sleep(1.0)
            self._stop.wait(interval)

    def stop(self) -> None:
        self._stop.set()

    def tick(self, now: float) -> None:
        world = self.world_size
        heartbeats = ft.get_all(self.store, "hb", world)
        joins = ft.get_all(self.store, "join", world)
        exits = ft.get_all(self.store, "exit", world)
        reports = ft.get_all(self.store, "report", world)
        self._observe(now, heartbeats, exits, joins)
        if self.shape is None and not self._learn_shape(joins):
            return
        if self.pending is not None and self._formed(self.pending):
            self._promote()
        if self.phase in (STARTING, AWAITING):
            self._publish_full(now, joins, heartbeats)
            return
        if self.phase != RUNNING:
            return
        incarnations = {**(self.pending.incarnations if self.pending else {}),
                        **(self.running.incarnations if self.running else {})}  # fmt: skip
        dead = [r for r in sorted(incarnations) if self._is_dead(r, incarnations[r], heartbeats, now)]
        if dead:
            self._failure(now, dead)
        elif self.running is not None and all(r in self._done for r in self.running.members):
            self._finish()
        elif self.running is not None and self._reported(reports, now):
            self._failure(now, [])
        elif self.running is not None and self.pending is None and self.running.world_size < world:
            self._rejoin_if_ready(now, joins, heartbeats)
        elif self.running is None and now - self._waiting_since > self.join_timeout_s:
            self._fail(f"epoch {self.pending.id} did not form within fault.join_timeout_s={self.join_timeout_s:.0f} s")

    # -- observing -------------------------------------------------------------------

    def _observe(self, now: float, heartbeats, exits, joins) -> None:
        for rank, beat in enumerate(heartbeats):
            raw = json.dumps(beat, sort_keys=True) if beat is not None else None
            if self._heartbeats.get(rank, (None, 0.0))[0] != raw:
                self._heartbeats[rank] = (raw, now)
            if not self._fixed_timeout and joins[rank] is not None and "timeout_s" in joins[rank]:
                self.timeout_s = float(joins[rank]["timeout_s"])  # the workers' fault.timeout_s
        for rank, record in enumerate(exits):
            if record is None:
                continue
            if record.get("code") == 0:
                self._done.add(rank)
            elif int(record["incarnation"]) not in self._dead[rank]:
                self._dead[rank].add(int(record["incarnation"]))
                self.log(
                    f"coordinator: rank {rank} (incarnation {record['incarnation']}, pid {record.get('pid')}) exited "
                    f"with {record.get('how', record.get('code'))}"
                )

    def _learn_shape(self, joins) -> bool:
        """The grid from the first join records (all must agree)."""
        shapes = {(j.get("replicas", 1), j.get("layout", "shards_on_host")) for j in joins if j is not None}
        if len(shapes) > 1:
            self._fail(f"the ranks disagree on sharding.replicas / layout: {sorted(shapes)}")
            return False
        if not shapes:
            return False
        replicas, layout = shapes.pop()
        self.shape = JobShape(self.world_size, int(replicas), layout)
        return True

    def _is_dead(self, rank: int, incarnation: int, heartbeats, now: float) -> bool:
        if rank in self._done:
            return False
        if incarnation in self._dead[rank]:
            return True
        beat = heartbeats[rank]
        if beat is None:
            return False
        if int(beat["incarnation"]) > incarnation:
            return True  # a newer process of this rank started: this one is gone
        if int(beat["incarnation"]) == incarnation and now - self._heartbeats[rank][1] > self.timeout_s:
            self._dead[rank].add(incarnation)
            self.log(f"coordinator: rank {rank} (incarnation {incarnation}) sent no heartbeat for {self.timeout_s:.0f} s: "
                     f"hung or cut off (its last: {beat.get('state')} at step {beat.get('step')}); fenced")
            # Its launcher kills it (and starts a replacement) whenever it can reach the store again.
            ft.set_json(self.store, ft.key("fence", rank), {"incarnation": incarnation})
            return True
        return False

    def _valid_joins(self, joins, heartbeats, now: float) -> Dict[int, Tuple[int, str]]:
        """Join records of processes that are alive, by rank."""
        valid = {}
        for rank, record in enumerate(joins):
            if record is None:
                continue
            incarnation = int(record["incarnation"])
            if not self._is_dead(rank, incarnation, heartbeats, now):
                valid[rank] = (incarnation, record["state"])
        return valid

    def _formed(self, epoch: Epoch) -> bool:
        """Every member of ``epoch`` has arrived (``member.join``'s barrier)."""
        counter = f"ft/epoch/{epoch.id}/arrived"
        return self.store.check([counter]) and self.store.add(counter, 0) >= epoch.world_size

    def _promote(self) -> None:
        """The pending epoch formed: it is the running one. Its members' join
        records are spent (each cleared only if it is still the record that
        joined: a newer one, of a later failure or process, stays)."""
        epoch, self.pending = self.pending, None
        self.running, self._current = epoch, list(epoch.members)
        self.store.set("ft/pending", ft.EMPTY)  # taken: nobody is to switch any more
        for rank in epoch.members:
            name = ft.key("join", rank)
            raw = self.store.get(name)
            record = json.loads(raw) if raw else None
            if record and int(record["incarnation"]) == epoch.incarnations[rank] and int(record.get("after", -1)) < epoch.id:
                self.store.compare_set(name, raw, ft.EMPTY)
        self.log(f"coordinator: epoch {epoch.id} formed")

    def _reported(self, reports, now: float) -> bool:
        """A member reported a failed collective of the running epoch and,
        ``timeout_s`` later, nobody is found dead: re-form every rank."""
        if not any(r is not None and int(r.get("epoch", -1)) == self.running.id for r in reports):
            self._report_since = None
            return False
        if self._report_since is None:
            self._report_since = now
        return now - self._report_since > self.timeout_s + 2.0

    # -- deciding --------------------------------------------------------------------

    def _failure(self, now: float, dead: List[int]) -> None:
        running, pending = self.running, self.pending
        self.failures += 1
        reason = f"ranks {dead} failed" if dead else "a collective failed with every rank alive"
        aborted = [e.id for e in (running, pending) if e is not None]
        self.log(f"coordinator: epoch(s) {aborted} aborted: {reason} (failure {self.failures} of at most {self.max_failures})")
        for epoch_id in aborted:
            self.store.set(f"ft/abort/{epoch_id}", reason.encode())
        incarnations = {**(pending.incarnations if pending else {}), **(running.incarnations if running else {})}
        for rank in dead:
            ft.set_json(self.store, ft.key("fence", rank), {"incarnation": incarnations[rank]})
        self.store.set("ft/pending", ft.EMPTY)
        self.history.append({"epochs": aborted, "dead": dead, "at": time.time()})
        self._report_since = None
        self._current = [r for r in self._current if r not in dead]
        self.running = self.pending = None
        self._waiting_since = now
        if self.failures > self.max_failures:
            self._fail(f"{self.failures} failures: more than fault.max_failures={self.max_failures}")
            return
        if running is not None:
            degraded = degraded_epoch(self.latest_id + 1, self.shape, self._current, running.incarnations,
                                      f"{reason}; the whole replica groups go on")  # fmt: skip
            if degraded is not None:
                self._publish(degraded)
                return
        self.phase = AWAITING
        self.log(f"coordinator: waiting for every rank to join epoch {self.latest_id + 1} (replacements of {dead})")

    def _publish_full(self, now: float, joins, heartbeats) -> None:
        valid = self._valid_joins(joins, heartbeats, now)
        first = self.phase == STARTING
        epoch = full_epoch(self.latest_id + 1, self.shape, self._current, valid, "start" if first else "every rank back")
        if epoch is None:
            if now - self._waiting_since > self.join_timeout_s:
                missing = sorted(set(range(self.world_size)) - set(valid))
                self._fail(f"ranks {missing} did not join within fault.join_timeout_s={self.join_timeout_s:.0f} s")
            return
        if first:
            epoch.roles = {r: "survivor" for r in epoch.members}  # nothing to restore: the initial state
        self._publish(epoch)

    def _rejoin_if_ready(self, now: float, joins, heartbeats) -> None:
        valid = self._valid_joins(joins, heartbeats, now)
        missing = [r for r in range(self.world_size) if r not in self.running.members]
        if not all(r in valid for r in missing):
            return
        for r in self.running.members:  # the running members go on under their current incarnations
            valid[r] = (self.running.incarnations[r], "intact")
        epoch = full_epoch(self.latest_id + 1, self.shape, self.running.members, valid, f"ranks {missing} back")
        self._publish(epoch, switch=True)

    def _publish(self, epoch: Epoch, switch: bool = False) -> None:
        """Publishes ``epoch`` as pending: its members join it (running
        members at their next step boundary when ``switch``)."""
        self.store.set(f"ft/epoch/{epoch.id}", epoch.to_json().encode())
        self.store.set("ft/epoch/latest", str(epoch.id).encode())
        if switch:
            self.store.set("ft/pending", str(epoch.id).encode())
        self.latest_id, self.pending, self.phase = epoch.id, epoch, RUNNING
        self._waiting_since = time.monotonic()
        self.log(f"coordinator: published {epoch.describe()}")

    def _finish(self) -> None:
        self.phase = FINISHED
        if self.pending is not None:
            self.store.set(f"ft/abort/{self.pending.id}", b"the job finished")
        self.store.set("ft/finished", b"1")
        self.log(f"coordinator: the job finished (epoch {self.running.id}; {self.failures} failure(s) survived)")

    def _fail(self, reason: str) -> None:
        self.phase = FAILED
        self.store.set("ft/failed", reason.encode())
        self.log(f"coordinator: the job failed: {reason}")
