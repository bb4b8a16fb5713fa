"""Two hosts in network namespaces, two ranks each, real links
(``dist_rec.fault.netns``): the multi-node launch paths, and a host whose
link goes down.

* ``launch/multi_node.sh`` (torchrun) trains across the two hosts.
* The fault-tolerant launcher trains a 2D job (a replica group per host)
  across them; when one host's link goes down the other host's replica
  group keeps training, and the cut host rejoins once its link is back.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path  # noqa: F401

from launching import REPO, TINY, WORKER, Job, free_port, job_env

from dist_rec.fault.netns import Hosts


def _wait(predicate, timeout: float, what: str, procs=(), logs=()):
    """Polls ``predicate`` until it holds; fails with the launchers' logs
    when it does not in ``timeout`` s or a launcher exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(proc.poll() is not None for proc in procs):
            break
        time.sleep(0.2)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = "\n".join(f"--- {path.name}:\n{path.read_text()[-6000:]}" for path in logs)
    raise AssertionError(f"{what}: did not happen\n{text}")


def _events(path):
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_multi_node_sh_trains_across_two_hosts(tmp_path):
    port = free_port()
    with Hosts(2) as hosts:
        procs = []
        for host in range(2):
            env = hosts.env({"RDZV_ENDPOINT": f"{hosts.address(0)}:{port}", "PYTHON": sys.executable,
                             "RDZV_IS_HOST": str(int(host == 0)), "LOCAL_ADDR": hosts.address(host)})  # fmt: skip
            procs.append(hosts.popen(host, ["launch/multi_node.sh", "--config", str(TINY), "train.steps=30",
                                            "sharding.type=row_wise", f"train.output_dir={tmp_path / 'out'}"],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True))  # fmt: skip
        try:
            outputs = [p.communicate(timeout=240)[0] for p in procs]
        finally:  # a node left waiting (at torchrun's exit barrier, say) must not outlive the test
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["processes"] == 4 and summary["steps"] == 30


def test_a_cut_host_leaves_the_other_replica_group_training_and_rejoins(tmp_path):
    timeout = 8.0
    port = free_port()
    overrides = [f"train.output_dir={tmp_path / 'out'}", "sharding.type=table_wise", "sharding.replicas=2",
                 "train.batch_size=64", "train.steps=3600", "train.eval_every=0", "train.log_every=50",
                 f"fault.timeout_s={timeout}", "fault.heartbeat_s=0.5"]  # fmt: skip
    events = tmp_path / "out" / "fault_events.jsonl"
    with Hosts(2) as hosts:
        procs, logs = [], [tmp_path / f"launcher{host}.log" for host in range(2)]
        for host in range(2):
            command = [sys.executable, "-m", "dist_rec.fault.launch", "--nnodes", "2", "--node-rank", str(host),
                       "--nproc-per-node", "2", "--store", f"{hosts.address(0)}:{port}", str(WORKER),
                       "--config", str(TINY), *overrides]  # fmt: skip
            with open(logs[host], "w") as log:
                procs.append(hosts.popen(host, command, cwd=REPO, env=hosts.env(job_env(tmp_path)), stdout=log,
                                         stderr=subprocess.STDOUT))  # fmt: skip

        def steps_of(ranks, after=0.0):
            return [e for e in _events(events) if e["event"] == "step" and e["rank"] in ranks and e["time"] > after]

        try:
            _wait(lambda: len(steps_of({0})) >= 60, 120, "training to start", procs, logs)
            cut = time.time()
            hosts.cut(1)
            # The other replica group (host 0) goes on as a job of its own ...
            _wait(lambda: len(steps_of({0, 1}, cut + timeout)) >= 100, 90, "host 0's group to train on", procs, logs)
            during = [e for e in _events(events) if e["event"] == "joined" and e["time"] > cut]
            assert during and all(e["members"] == [0, 1] for e in during)
            back = time.time()
            hosts.restore(1)
            # ... and host 1 comes back into the job.
            _wait(lambda: any(e["event"] == "joined" and e["time"] > back and e["members"] == [0, 1, 2, 3]
                              for e in _events(events)), 120, "host 1 to rejoin", procs, logs)  # fmt: skip
            _wait(lambda: all(p.poll() is not None for p in procs), 300, "the job to end", procs=(), logs=logs)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log.read_text()[-4000:] for log in logs)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3600 and summary["lost_samples"] == 0
    assert "replica rebuild" in {f["recovery"] for f in summary["failures"]}
    # The cut host's ranks rejoined with shards equal to their live replicas'.
    rejoined = [e for e in _events(events) if e["event"] == "restored" and e["rank"] in (2, 3) and e["time"] > back]
    assert rejoined and all(e["recovery"] == "replica rebuild" for e in rejoined)
