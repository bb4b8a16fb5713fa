"""The fault-tolerant launcher: ``python -m dist_rec.fault.launch``.

``torchrun``'s agent stops every local worker when one dies, and its
rendezvous restarts the workers of every node: a failure costs the whole
job a restart and a checkpoint load. This launcher (one per node, like
torchrun's agent) restarts only the dead worker:

* it starts the node's workers with torchrun's environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) plus the address of
  the job's store (``DIST_REC_FT_STORE``) and the worker's incarnation
  (``DIST_REC_FT_INCARNATION``: 0, then 1 for its first replacement, ...);
* when a worker exits with an error (or is killed), it records the exit in
  the store and starts a replacement with the next incarnation, which
  rebuilds its objects and joins the running job (``dist_rec.fault.member``);
  the other workers keep running;
* it kills a worker the coordinator declared dead (``ft/fence``: a hung
  process, or one on a host that was cut off), which is then replaced;
* it keeps ``--standby`` spare processes per node, started like workers but
  without a rank: a spare imports torch and builds the data pipeline and the
  model skeleton ahead, then waits; a dead worker's place goes to a ready
  spare (``ft/assign``), which only has to shard, join and restore, and a
  new spare is started behind it once the recovery is done
  (``--spare-delay``: a spare's build would take the recovering ranks' CPU);
* the first node's launcher hosts the store and runs the coordinator
  (``coordinator.py``), and stays until every rank has finished.

A worker that exits 0 is done; one that exits with ``EXIT_JOB_FAILED`` (a
program error every rank would meet: bad input, a bug) ends the job, as
does the coordinator giving up. Usage (one node, then each of two nodes)::

    python -m dist_rec.fault.launch --nproc-per-node 2 -m dist_rec.train --config launch/configs/default.yaml
    python -m dist_rec.fault.launch --nnodes 2 --node-rank 0 --store 10.0.0.1:29400 --nproc-per-node 2 -m dist_rec.train ...
    python -m dist_rec.fault.launch --nnodes 2 --node-rank 1 --store 10.0.0.1:29400 --nproc-per-node 2 -m dist_rec.train ...

``launch/ft_train.sh`` wraps it as ``launch/train.sh`` wraps torchrun.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from dist_rec.fault import store as ft
from dist_rec.fault.coordinator import FAILED, FINISHED, Coordinator
from dist_rec.fault.member import ENV_INCARNATION, ENV_STANDBY, ENV_STORE

EXIT_JOB_FAILED = 3  # a worker's program error: the job stops


def _die_with_parent() -> None:
    """In the worker, before exec: the kernel kills it when its launcher
    dies (a killed launcher must not leave workers behind)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _say(message: str) -> None:
    print(f"[dist_rec.fault.launch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class _Worker:
    def __init__(self, rank: int, local_rank: int) -> None:
        self.rank, self.local_rank = rank, local_rank
        self.incarnation = -1
        self.process: Optional[subprocess.Popen] = None
        self.done = False
        self.restarts = 0


class Launcher:
    """One node's launcher (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, command: List[str]) -> None:
        self.args, self.command = args, command
        self.world_size = args.nnodes * args.nproc_per_node
        self.first_node = args.node_rank == 0
        self.workers = [
            _Worker(args.node_rank * args.nproc_per_node + local, local) for local in range(args.nproc_per_node)
        ]
        self.coordinator: Optional[Coordinator] = None
        self.spares: List[Dict] = []  # {"name", "process"}
        self._spares_started = 0
        self._spares_due: List[float] = []  # when the spares that replace consumed ones start (monotonic)
        self._unsent: List = []  # store writes that failed (the store is unreachable): retried
        self._store_down_since: Optional[float] = None
        self.store = self._connect()

    def _connect(self):
        deadline = time.monotonic() + self.args.join_timeout
        if self.first_node:  # the server lives as long as this launcher
            self._server = ft.connect(self.args.store, timeout_s=10.0, is_master=True)
        while True:
            try:
                store = ft.ReconnectingStore(self.args.store, timeout_s=10.0)
                break
            except Exception as error:
                if self.first_node or time.monotonic() > deadline:
                    raise SystemExit(f"dist_rec.fault.launch: cannot reach the store at {self.args.store}: {error}")
                time.sleep(1.0)
        if self.first_node:
            ft.initialise(store, self.world_size)
            coordinator_store = ft.ReconnectingStore(self.args.store, timeout_s=10.0)
            self.coordinator = Coordinator(
                coordinator_store, self.world_size, timeout_s=self.args.timeout, join_timeout_s=self.args.join_timeout,
                max_failures=self.args.max_failures, log=_say,
            )  # fmt: skip
            threading.Thread(target=self.coordinator.run, name="dist_rec-coordinator", daemon=True).start()
        else:
            while not store.check(["ft/epoch/latest"]):  # the first node has initialised the keys
                time.sleep(0.2)
        return store

    # -- workers ---------------------------------------------------------------------

    def _spawn(self, rank: int, local_rank: int, incarnation: int, standby: str = "") -> subprocess.Popen:
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(local_rank),
            LOCAL_WORLD_SIZE=str(self.args.nproc_per_node),
            GROUP_RANK=str(self.args.node_rank),
            MASTER_ADDR=self.args.store.rpartition(":")[0],
            MASTER_PORT=self.args.store.rpartition(":")[2],
        )
        env[ENV_STORE] = self.args.store
        env[ENV_INCARNATION] = str(incarnation)
        env[ENV_STANDBY] = standby
        env.setdefault("OMP_NUM_THREADS", "1")
        return subprocess.Popen([sys.executable, *self.command], env=env, preexec_fn=_die_with_parent)

    def _start(self, worker: _Worker) -> None:
        """The worker's next incarnation: a ready spare when there is one,
        else a new process."""
        worker.incarnation += 1
        spare = self._ready_spare()
        if spare is not None:
            self._write(f"ft/assign/{spare['name']}", {"rank": worker.rank, "incarnation": worker.incarnation})
            worker.process = spare["process"]
            self.spares.remove(spare)
            _say(f"rank {worker.rank}: incarnation {worker.incarnation} is spare {spare['name']} (pid {worker.process.pid})")
            self._spares_due.append(time.monotonic() + self.args.spare_delay)
            return
        worker.process = self._spawn(worker.rank, worker.local_rank, worker.incarnation)
        _say(f"rank {worker.rank}: started incarnation {worker.incarnation} (pid {worker.process.pid})")

    def _start_spare(self) -> None:
        name = f"{self.args.node_rank}.{self._spares_started}"
        self._spares_started += 1
        self.spares.append({"name": name, "process": self._spawn(-1, 0, -1, standby=name)})

    def _ready_spare(self) -> Optional[Dict]:
        for spare in self.spares:
            if spare["process"].poll() is None and self._read(f"ft/standby/{spare['name']}") is not None:
                return spare
        return None

    def _tend_spares(self) -> None:
        """Starts the spares due, and replaces a spare that exited (it never held a rank)."""
        now = time.monotonic()
        for due in [d for d in self._spares_due if d <= now]:
            self._spares_due.remove(due)
            self._start_spare()
        for spare in list(self.spares):
            if spare["process"].poll() is not None:
                self.spares.remove(spare)
                if self._spares_started < self.args.standby + self.world_size * self.args.max_restarts:
                    self._start_spare()

    def _write(self, name: str, value) -> None:
        self._unsent.append((name, value))
        self._flush()

    def _reach(self, call, default=None):
        """``call()`` on the store; ``default`` while it is unreachable (this
        node cut off): the workers keep running and it is retried."""
        try:
            value = call()
        except Exception:
            if self._store_down_since is None:
                self._store_down_since = time.monotonic()
                _say(f"the store at {self.args.store} is unreachable; workers keep running, retrying")
            return default
        if self._store_down_since is not None:
            _say(f"the store is reachable again after {time.monotonic() - self._store_down_since:.0f} s")
            self._store_down_since = None
        return value

    def _flush(self) -> None:
        while self._unsent:
            name, value = self._unsent[0]
            if not self._reach(lambda: ft.set_json(self.store, name, value) or True, False):
                return
            self._unsent.pop(0)

    def _read(self, name: str):
        return self._reach(lambda: ft.get_if_set(self.store, name))

    def _read_raw(self, name: str) -> bytes:
        return self._reach(lambda: self.store.get(name) if self.store.check([name]) else b"", b"")

    def _reap(self, worker: _Worker) -> None:
        code = worker.process.poll()
        if code is None or worker.done:
            return
        how = signal.Signals(-code).name if code < 0 else f"exit code {code}"
        self._write(ft.key("exit", worker.rank), {
            "incarnation": worker.incarnation, "code": code, "how": how, "pid": worker.process.pid, "at": time.time(),
        })  # fmt: skip
        if code == 0:
            worker.done = True
            _say(f"rank {worker.rank}: incarnation {worker.incarnation} finished")
            return
        if code == EXIT_JOB_FAILED:
            worker.done = True
            _say(f"rank {worker.rank}: the program failed (exit {code}); the job stops")
            self._write("ft/failed", f"rank {worker.rank} failed with a program error")
            return
        if worker.restarts >= self.args.max_restarts:
            worker.done = True
            _say(f"rank {worker.rank}: {how}; no restarts left (--max-restarts {self.args.max_restarts})")
            self._write("ft/failed", f"rank {worker.rank} died {worker.restarts + 1} times")
            return
        worker.restarts += 1
        _say(f"rank {worker.rank}: incarnation {worker.incarnation} (pid {worker.process.pid}) ended with {how}; "
             "starting a replacement")  # fmt: skip
        self._start(worker)

    def _fence(self, worker: _Worker) -> None:
        fence = self._read(ft.key("fence", worker.rank))
        if fence is None or worker.done or worker.process.poll() is not None:
            return
        if int(fence["incarnation"]) == worker.incarnation:
            _say(f"rank {worker.rank}: the coordinator declared incarnation {worker.incarnation} dead; killing pid "
                 f"{worker.process.pid}")  # fmt: skip
            worker.process.kill()
            worker.process.wait()

    def kill_all(self) -> None:
        processes = [w.process for w in self.workers if w.process is not None] + [s["process"] for s in self.spares]
        for process in processes:
            if process.poll() is None:
                process.kill()
        for process in processes:
            process.wait()
        self.spares = []

    def run(self) -> int:
        for worker in self.workers:
            self._start(worker)
        for _ in range(self.args.standby):
            self._start_spare()
        finished_at = None
        try:
            while True:
                self._flush()
                for worker in self.workers:
                    self._reap(worker)
                    self._fence(worker)
                self._tend_spares()
                failed = self._read_raw("ft/failed")
                if failed:
                    _say(f"the job failed: {failed.decode()}")
                    self.kill_all()
                    return 1
                if all(w.done for w in self.workers) and not self._unsent:
                    self.kill_all()  # the spares
                    if not self.first_node:
                        return 0
                    if self._all_exited() or self.coordinator.phase == FAILED:
                        return 0 if self.coordinator.phase != FAILED else 1
                    if self.coordinator.phase == FINISHED:
                        # Ranks still waiting elsewhere learn of the end from the store: keep it up a while.
                        finished_at = finished_at or time.monotonic()
                        if time.monotonic() - finished_at > self.args.timeout_after_finish:
                            return 0
                if self._store_down_since is not None and time.monotonic() - self._store_down_since > self.args.join_timeout:
                    _say(f"the store has been unreachable for {self.args.join_timeout:.0f} s; stopping this node's workers")
                    self.kill_all()
                    return 1
                time.sleep(0.1)
        except KeyboardInterrupt:
            self.kill_all()
            return 130
        finally:
            if self.coordinator is not None:
                self.coordinator.stop()

    def _all_exited(self) -> bool:
        try:
            exits = ft.get_all(self.store, "exit", self.world_size)
        except Exception:
            return False
        return all(e is not None and e.get("code") == 0 for e in exits)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--store", default="127.0.0.1:29400", help="host:port of the job's store (on the first node)")
    parser.add_argument("--max-restarts", type=int, default=10, help="replacements per rank before the job fails")
    parser.add_argument("--timeout", type=float, default=None, help="a heartbeat unchanged this long means a dead rank "
                        "(default: the workers' fault.timeout_s)")  # fmt: skip
    parser.add_argument("--join-timeout", type=float, default=600.0, help="how long an epoch may wait for its ranks")
    parser.add_argument("--max-failures", type=int, default=10)
    parser.add_argument("--standby", type=int, default=1, help="spare processes per node, built ahead to replace a "
                        "dead worker at once (0: a replacement starts from scratch)")  # fmt: skip
    parser.add_argument("--spare-delay", type=float, default=10.0, help="seconds after a spare took a dead worker's "
                        "place before the next spare starts (its build would slow the recovery)")  # fmt: skip
    parser.add_argument("--timeout-after-finish", type=float, default=60.0,
                        help="how long the first node keeps the store up for ranks still waiting when the job finished")
    parser.usage = "%(prog)s [options] (-m module | script) [args ...]"
    argv = list(sys.argv[1:] if argv is None else argv)
    split = 0  # the worker command starts at "-m", "--", or the first word that is not an option or its value
    while split < len(argv) and argv[split].startswith("--") and argv[split] != "--":
        split += 1 if "=" in argv[split] or argv[split] in ("-h", "--help") else 2
    args = parser.parse_args(argv[:split])
    command = argv[split:]
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("give the worker command, e.g. -m dist_rec.train --config launch/configs/default.yaml")
    if args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        parser.error(f"invalid --nnodes {args.nnodes} / --node-rank {args.node_rank} / --nproc-per-node {args.nproc_per_node}")
    launcher = Launcher(args, command)
    signal.signal(signal.SIGTERM, lambda *_: (launcher.kill_all(), sys.exit(143)))
    return launcher.run()


if __name__ == "__main__":
    from dist_rec.distributed.world import exit_process

    try:
        exit_code = main()
    except SystemExit as exit_:
        exit_code = exit_.code if isinstance(exit_.code, int) else 1
    exit_process(exit_code)  # the store server and the coordinator's store calls are C++ threads: no teardown
