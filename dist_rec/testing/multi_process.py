"""Run a function on several processes joined by a gloo process group.

Each rank runs ``fn(rank, world_size, **kwargs)`` in its own spawned process
on loopback; ``run_multi_process`` raises if any rank fails or hangs, with
that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from dist_rec.distributed import init_process_group


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, kwargs: dict, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    try:
        init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, **kwargs)
        dist.barrier()  # every rank done with every collective
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    # Leave without the interpreter's teardown: gloo's worker threads can
    # still drop the last reference to a tensor there, and the process then
    # aborts ("terminate called without an active exception") after a rank
    # that did everything right (seen rarely, under load). The test's verdict
    # is already in hand; the group dies with the process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_multi_process(fn: Callable[..., Any], world_size: int = 2, timeout: float = 120.0, **kwargs: Any) -> None:
    """Runs ``fn(rank, world_size, **kwargs)`` on ``world_size`` gloo ranks.

    ``fn`` must be importable (a module-level function): ranks are spawned.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world_size, port, fn, kwargs, errors)) for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        # A rank that fails first makes its peers' collectives fail too: its own error leads.
        consequence = ("Connection closed by peer", "Connection reset by peer", "aborted its collectives")
        failures.sort(key=lambda f: (any(c in f[1] for c in consequence), f[0]))
        rank, tb = failures[0]
        others = "".join(f"\n--- rank {r} failed too:\n{t}" for r, t in failures[1:])
        raise AssertionError(f"rank {rank} failed:\n{tb}{others}")
    if hung:
        raise AssertionError(f"ranks {hung} did not finish within {timeout} s")
    bad = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited with non-zero codes: {bad}")
