"""This worker's side of a fault-tolerant job.

``FaultMember`` connects a worker started by ``dist_rec.fault.launch`` to
the job's store and keeps a monitor thread running beside training:

* every ``heartbeat_s`` it writes the worker's heartbeat (incarnation,
  epoch, step, state): the coordinator declares a rank dead when its
  heartbeat stops (a SIGSTOPped process's threads stop with it; a host cut
  off cannot write);
* it watches the store for the abort of the worker's epoch and then makes
  every collective of this process fail at once
  (``dist_rec.distributed.abort``), however deep in gloo the training
  thread waits; and for a *pending* epoch (ranks coming back), which the
  training thread switches to at its next step boundary;
* as the watchdog, it logs what the training thread has been waiting for,
  since when, and which peers' heartbeats have gone quiet.

``join`` is how a worker enters an epoch: at the start, after a failure
(keeping its memory), or as a replacement. ``events`` appends one JSON
line per event to ``<output_dir>/fault_events.jsonl`` (failures, waits,
epochs, restores, and every step), the record the tests and the recovery
benchmark read.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from dist_rec.fault import store as ft
from dist_rec.fault.activity import ACTIVITY
from dist_rec.fault.membership import Epoch

ENV_STORE = "DIST_REC_FT_STORE"
ENV_INCARNATION = "DIST_REC_FT_INCARNATION"
ENV_STANDBY = "DIST_REC_FT_STANDBY"  # set on a spare: its name; it waits for a rank to take over


class JobEnded(SystemExit):
    """The job ended without this worker: it finished (code 0) or gave up."""


def fault_log(rank: int, incarnation: int, message: str) -> None:
    """One line of this rank's fault-tolerance story, on stderr."""
    stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
    print(f"[dist_rec.fault {stamp} rank {rank}.{incarnation}] {message}", file=sys.stderr, flush=True)


class EventLog:
    """JSON lines appended to a file shared by every rank (O_APPEND: lines
    of several processes never interleave), or nowhere."""

    def __init__(self, path: Optional[Path], rank: int, incarnation: int) -> None:
        self.rank, self.incarnation = rank, incarnation
        self._fd = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, event: str, **fields) -> None:
        if self._fd is None:
            return
        record = {"time": time.time(), "rank": self.rank, "incarnation": self.incarnation, "event": event, **fields}
        os.write(self._fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Watchdog:
    """Logs a wait of the training thread that lasts: what it waits for
    (``ACTIVITY``), since when, and the peers whose heartbeats went quiet
    (``peers()``: a line, or ""). Called from the monitor thread."""

    def __init__(self, say: Callable[[str], None], warn_after_s: float, peers: Callable[[], str] = lambda: "") -> None:
        self.say, self.warn_after_s, self.peers = say, float(warn_after_s), peers
        self._warned_for = None
        self._next_warning = 0.0

    def check(self, now: float) -> None:
        since = ACTIVITY.since
        waited = now - since
        if waited < self.warn_after_s:
            return
        if self._warned_for != since:
            self._warned_for, self._next_warning = since, now
        if now < self._next_warning:
            return
        self._next_warning = now + self.warn_after_s
        started = time.strftime("%H:%M:%S", time.localtime(ACTIVITY.started_at))
        peers = self.peers()
        self.say(f"waiting {waited:.0f} s (since {started}) in {ACTIVITY.describe()}" + (f"; {peers}" if peers else ""))


class FaultMember:
    """A worker of a job launched by ``dist_rec.fault.launch``.

    Args:
        rank (int): the worker's original rank (its place in the job as launched).
        world_size (int): the job's ranks as launched.
        incarnation (int): 0 for the first process of this rank, then 1, 2, ...
        store_address (str): host:port of the job's store.
        config: the run's ``FaultConfig`` (timeouts, heartbeat).
        replicas, layout: the job's 2D grid (told to the coordinator).
        events_path (Optional[Path]): where ``events`` appends.
    """

    def __init__(self, rank: int, world_size: int, incarnation: int, store_address: str, config,
                 replicas: int = 1, layout: str = "shards_on_host", events_path: Optional[Path] = None,
                 standby: Optional[str] = None) -> None:  # fmt: skip
        self.rank, self.world_size, self.incarnation = int(rank), int(world_size), int(incarnation)
        self.address, self.config = store_address, config
        self.replicas, self.layout = int(replicas), layout
        self.standby = standby
        self.store = ft.ReconnectingStore(store_address, timeout_s=max(30.0, config.timeout_s))
        self.port = int(store_address.rpartition(":")[2])
        self._events_path = events_path
        self.events = EventLog(None if standby else events_path, self.rank, self.incarnation)
        self.epoch: Optional[Epoch] = None
        self.step, self.state = 0, "starting"
        self.pending: Optional[int] = None  # an epoch to switch to at the next step boundary
        self.aborted = threading.Event()  # the current epoch was aborted: collectives fail from now on
        self._handled_abort: Optional[int] = None
        self._abort: Callable[[str], None] = lambda reason: None
        self._seen_epochs = -1
        self._peer_beats: Dict[int, tuple] = {}
        self._stop = threading.Event()
        self.watchdog = Watchdog(self.say, config.warn_after_s, self._quiet_peers)
        self._thread = threading.Thread(target=self._monitor, name="dist_rec-fault-monitor", daemon=True)
        if standby is None:
            self._thread.start()
            self.events.write("start", pid=os.getpid(), host=socket.gethostname())

    @classmethod
    def from_env(cls, config, replicas: int = 1, layout: str = "shards_on_host", output_dir: Optional[str] = None):
        """The member of this process when the fault-tolerant launcher
        started it (``DIST_REC_FT_STORE`` set), else None."""
        address = os.environ.get(ENV_STORE)
        if not address:
            return None
        events = Path(output_dir) / "fault_events.jsonl" if output_dir and config.event_log else None
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get(ENV_INCARNATION, "0")),
                   address, config, replicas, layout, events, standby=os.environ.get(ENV_STANDBY) or None)  # fmt: skip

    def await_assignment(self) -> None:
        """A spare (``standby``), built as far as it can be without a rank:
        tells its launcher it is ready, then waits until the launcher hands
        it a dead rank's place (rank and incarnation), and becomes that rank's
        new process. A no-op for a process started with its rank."""
        if self.standby is None:
            return
        ft.set_json(self.store, f"ft/standby/{self.standby}", {"pid": os.getpid()})
        ACTIVITY.set("a spare, waiting to take a dead rank's place")
        while True:
            assignment = ft.get_if_set(self.store, f"ft/assign/{self.standby}")
            if assignment is not None:
                break
            if self.store.check(["ft/finished"]) or self.store.get("ft/failed"):
                raise JobEnded(0)
            time.sleep(0.02)
        self.rank, self.incarnation = int(assignment["rank"]), int(assignment["incarnation"])
        self.events = EventLog(self._events_path, self.rank, self.incarnation)
        self.standby = None
        self._thread.start()
        self.events.write("start", pid=os.getpid(), host=socket.gethostname(), spare=True)
        self.say("a spare takes this rank's place")

    def say(self, message: str) -> None:
        fault_log(self.rank, self.incarnation, message)

    def on_abort(self, abort: Callable[[str], None]) -> None:
        """``abort(reason)`` makes this process's collectives fail (the
        process-group owner's ``abort``); the monitor calls it when the
        coordinator aborts the current epoch."""
        self._abort = abort

    # -- entering an epoch -----------------------------------------------------------

    def join(self, state: str, step: int = 0, announce: bool = True) -> Epoch:
        """Offers this process for the next epoch (``state``: "fresh", or
        "intact" after a failure, keeping its memory) and waits until an
        epoch that includes it has formed: every member has arrived. Raises
        ``JobEnded`` when the job finished or failed meanwhile. Without
        ``announce`` it only waits (a pending epoch already names it)."""
        self.await_assignment()
        self.state = "joining"
        if announce:
            ft.set_json(self.store, ft.key("join", self.rank), {
                "incarnation": self.incarnation, "state": state, "step": int(step), "pid": os.getpid(),
                "after": self.epoch.id if self.epoch else -1, "timeout_s": self.config.timeout_s,
                "replicas": self.replicas, "layout": self.layout,
            })  # fmt: skip
        self.events.write("waiting", state=state, step=int(step))
        ACTIVITY.set("joining the next membership epoch (waiting for the coordinator)")
        while True:
            epoch = self._next_epoch()
            if self._arrive(epoch):
                self.epoch, self.pending = epoch, None
                self.aborted.clear()
                self.state = "forming"
                self.events.write("joined", epoch=epoch.id, role=epoch.roles[self.rank], members=epoch.members)
                return epoch

    def _next_epoch(self) -> Epoch:
        while True:
            self._check_ended()
            latest = int(self.store.get("ft/epoch/latest") or b"-1")
            while self._seen_epochs < latest:
                self._seen_epochs += 1
                epoch = Epoch.from_json(self.store.get(f"ft/epoch/{self._seen_epochs}").decode())
                if epoch.includes(self.rank, self.incarnation) and not self._is_aborted(epoch.id):
                    return epoch
            time.sleep(0.05)

    def _arrive(self, epoch: Epoch) -> bool:
        """Waits until every member of ``epoch`` has arrived (a store
        barrier that notices an abort, unlike the groups' own rendezvous)."""
        counter = f"ft/epoch/{epoch.id}/arrived"
        self.store.add(counter, 1)
        ACTIVITY.set(f"forming epoch {epoch.id}: waiting for ranks {epoch.members} to arrive")
        while self.store.add(counter, 0) < epoch.world_size:
            if self._is_aborted(epoch.id):
                self.say(f"epoch {epoch.id} was aborted before it formed; waiting for the next")
                return False
            self._check_ended()
            time.sleep(0.02)
        return True

    def _is_aborted(self, epoch_id: int) -> bool:
        return self.store.check([f"ft/abort/{epoch_id}"])

    def _check_ended(self) -> None:
        fence = ft.get_json(self.store, ft.key("fence", self.rank))
        if fence is not None and int(fence["incarnation"]) == self.incarnation:
            self.say("the coordinator declared this process dead (it was hung or cut off); leaving for a replacement")
            raise SystemExit(1)  # the launcher starts a replacement
        failed = self.store.get("ft/failed")
        if failed:
            raise JobEnded(f"the job failed: {failed.decode()}")
        if self.store.check(["ft/finished"]):
            self.say("the job finished without this rank")
            raise JobEnded(0)

    # -- reporting -----------------------------------------------------------------

    def report_failure(self, step: int, error: BaseException) -> None:
        """Tells the coordinator this rank's collectives failed."""
        self.state = "recovering"
        text = f"{type(error).__name__}: {error}"[:500]
        try:
            ft.set_json(self.store, ft.key("report", self.rank), {
                "epoch": self.epoch.id if self.epoch else -1, "step": step, "error": text, "incarnation": self.incarnation,
            })  # fmt: skip
        except Exception:
            pass  # the store is unreachable (this host was cut off): the coordinator sees the heartbeats stop
        self.events.write("failure", epoch=self.epoch.id if self.epoch else -1, step=step, error=text,
                          activity=ACTIVITY.describe())  # fmt: skip

    def training(self, step: int) -> None:
        self.step, self.state = step, "training"

    def close(self) -> None:
        self._stop.set()
        self.events.close()

    # -- the monitor thread ----------------------------------------------------------

    def _monitor(self) -> None:
        store = ft.ReconnectingStore(self.address, timeout_s=max(5.0, 5 * self.config.heartbeat_s))
        beats, next_beat, unreachable = 0, 0.0, False
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_beat:
                    beats += 1
                    ft.set_json(store, ft.key("hb", self.rank), {
                        "incarnation": self.incarnation, "count": beats, "epoch": self.epoch.id if self.epoch else -1,
                        "step": self.step, "state": self.state, "pid": os.getpid(), "host": socket.gethostname(),
                    })  # fmt: skip
                    next_beat = now + self.config.heartbeat_s
                    self._observe_peers(store, now)
                epoch = self.epoch
                if epoch is not None and self._handled_abort != epoch.id and store.check([f"ft/abort/{epoch.id}"]):
                    self._handled_abort = epoch.id
                    reason = store.get(f"ft/abort/{epoch.id}").decode()
                    self.aborted.set()
                    self.say(f"the coordinator aborted epoch {epoch.id} ({reason}); leaving every collective")
                    self._abort(f"epoch {epoch.id} aborted: {reason}")
                pending = store.get("ft/pending")
                if epoch is not None and pending and int(pending) > epoch.id:
                    self.pending = int(pending)
                if self.state in ("training", "recovering", "forming"):
                    self.watchdog.check(now)
                if unreachable:
                    self.say("the store is reachable again")
                    unreachable = False
            except Exception as error:
                if not unreachable:
                    self.say(f"the job's store is unreachable ({type(error).__name__}); retrying")
                    unreachable = True
                self._stop.wait(0.5)
                continue
            self._stop.wait(0.2)

    def _observe_peers(self, store, now: float) -> None:
        for rank, beat in enumerate(ft.get_all(store, "hb", self.world_size)):
            if rank == self.rank or beat is None:
                continue
            raw = json.dumps(beat, sort_keys=True)
            if self._peer_beats.get(rank, (None,))[0] != raw:
                self._peer_beats[rank] = (raw, now, beat)

    def _quiet_peers(self) -> str:
        """Peers whose heartbeat has not changed for over 2 heartbeats."""
        now, quiet = time.monotonic(), []
        for rank, (_, changed, beat) in sorted(self._peer_beats.items()):
            age = now - changed
            if age > 2 * self.config.heartbeat_s + 1:
                quiet.append(f"rank {rank} silent for {age:.0f} s (last: {beat.get('state')} at step {beat.get('step')})")
        return "; ".join(quiet) if quiet else "every peer's heartbeat is fresh"
