"""The default thread count (train.threads: 0): the cores this process may
run on (its CPU affinity, a container's cpuset) divided among the processes
on the host."""

import os
import subprocess
import sys

import pytest
import torch

from dist_rec.config import load_config
from dist_rec.trainer.environment import available_cores, default_threads, setup_environment


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

