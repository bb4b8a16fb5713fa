"""Where a training process runs: the default thread count (train.threads:
0, the cores this process may run on, its CPU affinity or a container's
cpuset, divided among the processes on the host), pinning to a block of
cores (train.pin_cores) and the allocator kept for training steps
(train.keep_freed_memory)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dist_rec.config import load_config
from dist_rec.trainer.environment import (
    available_cores, core_block, default_threads, is_glibc, keep_freed_memory, setup_environment,
)


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the host's: not ours to use


@pytest.mark.parametrize("local_world_size, threads", [(1, 8), (2, 4), (3, 2), (8, 1), (16, 1), (0, 8)])
def test_cores_divided_among_local_processes(eight_cores, local_world_size, threads):
    assert available_cores() == 8
    assert default_threads(local_world_size) == threads


def test_cpu_count_without_affinity(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert default_threads(2) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert default_threads(2) == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_affinity_of_a_real_process():
    """A process pinned to one core (as a 1-CPU container's cpuset pins it)
    gets one thread, whatever the host's core count."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "from dist_rec.trainer.environment import available_cores, default_threads;"
        "print(available_cores(), default_threads(1), os.cpu_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split()[:2] == ["1", "1"]


@pytest.fixture
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DIST_REC_FT_STORE", "DIST_REC_FT_INCARNATION", "DIST_REC_FT_STANDBY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # as if a second process shared the host
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("override, threads", [("train.threads=0", 4), ("train.threads=3", 3)])
def test_setup_environment_sets_torch_threads(eight_cores, single_process, override, threads):
    config = load_config(None, ["train.device=cpu", override])
    env = setup_environment(config)
    assert env.local_world_size == 2 and not env.distributed
    assert torch.get_num_threads() == threads



# -- pinning to cores (train.pin_cores) --------------------------------------------------------


@pytest.mark.parametrize(
    "cores, processes, blocks",
    [
        (range(8), 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (range(8), 3, [[0, 1, 2], [3, 4, 5], [6, 7]]),
        ([7, 5, 2, 0], 2, [[0, 2], [5, 7]]),  # a cpuset with gaps, in any order
        (range(2), 2, [[0], [1]]),
        (range(3), 3, [[0], [1], [2]]),
    ],
)
def test_core_blocks_split_the_cores_among_local_processes(cores, processes, blocks):
    assert [core_block(cores, rank, processes) for rank in range(processes)] == blocks


def test_a_cores_hyperthreads_stay_in_one_block():
    """cpu i and i + 4 are the two threads of core i (Intel's usual
    numbering): each process gets whole cores, not one thread of each."""
    topology = {cpu: (0, cpu % 4) for cpu in range(8)}
    assert [core_block(range(8), rank, 2, topology) for rank in range(2)] == [[0, 4, 1, 5], [2, 6, 3, 7]]
    two_packages = {cpu: (cpu % 2, cpu // 2) for cpu in range(8)}  # even CPUs on package 0
    assert core_block(range(8), 0, 2, two_packages) == [0, 2, 4, 6]


def test_no_block_when_processes_outnumber_cores():
    assert core_block(range(2), 0, 3) is None
    assert core_block(range(4), 4, 4) is None  # not a local rank of this host


_PINNING = """
import os, sys, threading
from dist_rec.config import load_config
from dist_rec.trainer.environment import core_block, setup_environment
before = sorted(os.sched_getaffinity(0))
seen, go = {}, threading.Event()
def record(name):
    go.wait()
    seen[name] = sorted(os.sched_getaffinity(0))
earlier = threading.Thread(target=record, args=("earlier",))  # running before the pinning
earlier.start()
setup_environment(load_config(None, ["train.device=cpu"] + sys.argv[1:]))
thread = threading.Thread(target=record, args=("thread",))
thread.start(); go.set(); thread.join(); earlier.join()
assert seen["earlier"] == seen["thread"], seen
pid = os.fork()
if pid == 0:
    os._exit(0 if sorted(os.sched_getaffinity(0)) == seen["thread"] else 1)
child_ok = os.waitpid(pid, 0)[1] == 0
print(before, sorted(os.sched_getaffinity(0)), seen["thread"], child_ok, core_block(before, 1, 2), sep=";")
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
@pytest.mark.parametrize("launched, overrides, pinned", [(True, [], True), (True, ["train.pin_cores=false"], False),
                                                         (False, [], False)])  # fmt: skip
def test_a_torchrun_process_is_pinned_to_its_block_with_its_threads_and_children(launched, overrides, pinned):
    """Local rank 1 of 2 (as torchrun launches it) runs on the second
    block of its cores, and so do its threads (those running before, those
    started after) and the processes it starts; with
    pin_cores off, or without torchrun's LOCAL_RANK, nothing changes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DIST_REC_FT_STORE")}
    env["LOCAL_WORLD_SIZE"] = "2"
    if launched:
        env["LOCAL_RANK"] = "1"
    out = subprocess.run([sys.executable, "-c", _PINNING, *overrides], capture_output=True, text=True, timeout=120,
                         env=env, check=True).stdout.strip().splitlines()[-1]  # fmt: skip
    before, after, thread, child_ok, block = out.split(";")
    expected = block if pinned and block != "None" else before
    assert after == expected and thread == expected and child_ok == "True"


@pytest.fixture
def pinnable_eight_cores(monkeypatch):
    """Eight CPUs whose affinity the test can change without moving itself."""
    state = {"cpus": set(range(8))}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(state["cpus"]), raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: state.update(cpus=set(cpus)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr("dist_rec.trainer.environment.cpu_topology", lambda cpus: {})
    return state


@pytest.mark.parametrize("local_world_size, cpus, threads", [("2", set(range(4, 8)), 4), ("3", {3, 4, 5}, 2)])
def test_pinned_processes_keep_the_threads_of_their_share(pinnable_eight_cores, single_process, monkeypatch,
                                                          local_world_size, cpus, threads):  # fmt: skip
    """The thread count is the host's cores divided among its processes,
    counted before pinning (not the block divided again)."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    setup_environment(load_config(None, ["train.device=cpu"]))
    assert pinnable_eight_cores["cpus"] == cpus
    assert torch.get_num_threads() == threads


def test_no_pinning_without_the_local_world_size(pinnable_eight_cores, single_process, monkeypatch):
    """A launcher that sets LOCAL_RANK but not LOCAL_WORLD_SIZE does not say
    how many processes share the host: nothing is pinned."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    setup_environment(load_config(None, ["train.device=cpu"]))
    assert pinnable_eight_cores["cpus"] == set(range(8))


# -- the allocator (train.keep_freed_memory) ----------------------------------------------------

_FAULTS = """
import json, resource, sys, torch
from dist_rec.config import load_config
from dist_rec.trainer import environment

def faults_per_step():
    # A step's tensor above glibc's largest adaptive mmap threshold (32 MiB): by default
    # mapped afresh and unmapped every time.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(40 << 20, dtype=torch.uint8).fill_(1)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4

applied = []
keep = environment.keep_freed_memory
environment.keep_freed_memory = lambda: applied.append(keep()) or applied[-1]
faults_per_step()
default = faults_per_step()
environment.setup_environment(load_config(None, ["train.device=cpu", *sys.argv[1:]]))
faults_per_step()  # the first step after still grows the heap
print(json.dumps(dict(default=default, after=faults_per_step(), applied=applied)))
"""


@pytest.mark.skipif(not is_glibc(), reason="glibc's allocator only")
@pytest.mark.parametrize("overrides, kept", [([], True), (["train.keep_freed_memory=false"], False)])
def test_a_training_process_keeps_the_memory_a_step_frees(overrides, kept):
    """A 40 MiB tensor made and freed every step is faulted in every step by
    default (10,240 pages of 4 KiB); after setup_environment it comes back
    from the heap without a fault, unless keep_freed_memory is off. In a
    process of its own (the setting is process-wide), with no allocator
    settings of the caller's."""
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DIST_REC_FT_STORE", "GLIBC_TUNABLES", "LD_PRELOAD",
               "THP_MEM_ALLOC_ENABLE")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _FAULTS, *overrides], capture_output=True, text=True, timeout=120,
                         env=env, check=True).stdout.splitlines()[-1]  # fmt: skip
    result = json.loads(out)
    assert result["default"] >= 10, result  # a page (of any size) faulted in every step
    if not kept:
        assert result["applied"] == [] and result["after"] > result["default"] / 2, result
    elif result["applied"] == [64 << 20]:
        assert result["after"] <= result["default"] / 10, result
    else:  # glibc before 2.35 takes 32 MiB at most: the 40 MiB tensor is still mapped anew
        assert result["applied"] == [32 << 20], result


@pytest.mark.parametrize("kwargs", [dict(mmap_threshold_bytes=0), dict(trim_threshold_bytes=2**31)])
def test_keep_freed_memory_refuses_what_mallopt_cannot_take(kwargs):
    with pytest.raises(ValueError, match=r"Invalid (mmap|trim)_threshold_bytes=\d+\. Must be in \[1, 2\*\*31 - 1\]"):
        keep_freed_memory(**kwargs)


@pytest.mark.parametrize("name, value", [("MALLOC_TRIM_THRESHOLD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1"),
                                         ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")])  # fmt: skip
def test_keep_freed_memory_leaves_the_users_allocator_settings_alone(monkeypatch, name, value):
    """Nothing is changed (0) where the user tuned glibc's malloc or
    preloaded another allocator; the check comes before any mallopt."""
    monkeypatch.setenv(name, value)
    assert keep_freed_memory() == 0
