"""``ProcessGroups.abort``: every collective of the process fails at once,
and so does every peer's collective that waits on it (the cascade recovery
relies on), from the thread that is blocked or from another one; the groups
re-formed afterwards work."""

import threading
import time

import torch
import torch.distributed as dist

from dist_rec.distributed import ProcessGroups
from dist_rec.distributed.errors import CollectiveFailure, is_collective_failure
from dist_rec.testing.multi_process import run_multi_process


def _abort_rank(rank, world_size):
    groups = ProcessGroups(timeout_s=60)
    pair = groups.subgroup("pair", [0, 1])
    t = torch.ones(4)
    dist.barrier()
    if rank == 0:
        # 1. Blocked on rank 1, which aborts instead of taking part: fails at once, not after 60 s.
        started = time.monotonic()
        try:
            dist.all_reduce(t, group=pair)
            raise AssertionError("the all-reduce completed without rank 1")
        except RuntimeError as error:
            assert is_collective_failure(error), error
        assert time.monotonic() - started < 10, f"noticed after {time.monotonic() - started:.1f} s"
    elif rank == 1:
        time.sleep(1.0)
        groups.abort("test: rank 1 leaves its collectives")
    if rank == 2:
        # 2. Blocked in a collective nobody joins; another thread aborts it.
        lonely = threading.Timer(1.0, lambda: groups.abort("test: the monitor thread aborts"))
        lonely.start()
        started = time.monotonic()
        try:
            dist.all_reduce(t)  # ranks 0 and 1 never join this one
            raise AssertionError("the all-reduce completed")
        except RuntimeError as error:
            assert is_collective_failure(error), error
        assert time.monotonic() - started < 10
    time.sleep(2.0)  # every rank has met its failure
    groups.rebuild()
    t = torch.full((4,), float(rank + 1))
    dist.all_reduce(t)
    assert t.tolist() == [6.0] * 4
    pair = groups.group("pair")
    if pair is not None:
        t = torch.ones(2)
        dist.all_reduce(t, group=pair)
        assert t.tolist() == [2.0, 2.0]


def test_abort_fails_collectives_at_once_here_and_at_the_peers_then_groups_rebuild():
    run_multi_process(_abort_rank, world_size=3, timeout=120)


def test_collective_failures_are_told_from_program_errors():
    assert is_collective_failure(CollectiveFailure("rank 1 exited"))
    assert is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"))
    assert is_collective_failure(RuntimeError("Timed out waiting 5000ms for recv operation to complete"))
    assert is_collective_failure(dist.DistNetworkError("Broken pipe"))
    wrapped = ValueError("while saving")
    wrapped.__cause__ = RuntimeError("Connection closed by peer [127.0.0.1]:123")
    assert is_collective_failure(wrapped)
    assert not is_collective_failure(ValueError("Invalid id 7 for table t0 with 5 rows"))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
