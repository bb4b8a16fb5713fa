"""Where a training process runs: its rank, the job's size, its device.

Under ``torchrun`` the process joins the job's default group at once.
Under the fault-tolerant launcher (``dist_rec.fault.launch``) it becomes a
``FaultMember`` first and joins a membership epoch once its model is built
(``join_first_epoch``): a replacement then makes the running ranks wait
only for the groups to form, not for its model. The process's rank and
the job's size are then the epoch's, which change when ranks are left out
or come back; ``data_rank`` and ``data_world_size`` (the rank's place in
the job as launched) decide which samples it reads, and never change.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

from dist_rec.config import ConfigError, TrainConfig
from dist_rec.distributed import init_process_group


@dataclass
class Environment:
    """Where this process runs: its rank, the group, the device."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    backend: Optional[str] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_rank: int = -1  # the samples this rank reads: its rank in the job as launched (-1: rank)
    data_world_size: int = -1  # ... and the job's size as launched (-1: world_size)
    member: Optional[object] = None  # the FaultMember under the fault-tolerant launcher

    def __post_init__(self) -> None:
        if self.data_rank < 0:
            self.data_rank = self.rank
        if self.data_world_size < 0:
            self.data_world_size = self.world_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.member is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's
    cpuset, ``taskset``), which ``os.cpu_count()`` ignores (it counts the
    host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def default_threads(local_world_size: int) -> int:
    """``train.threads: 0``: the cores divided among the processes on this
    host (at least one each)."""
    return max(1, available_cores() // max(local_world_size, 1))


def core_block(cores, local_rank: int, local_world_size: int, topology=None) -> Optional[List[int]]:
    """The CPUs of local process ``local_rank`` when the host's
    ``local_world_size`` processes split ``cores`` into blocks of adjacent
    CPUs (sizes differ by at most one); None when there are fewer CPUs than
    processes (no block of its own to give).

    Adjacent in the host's topology (``topology``: CPU -> (package, core),
    ``cpu_topology()``'s): the hyperthreads of one core, then the cores of
    one package, stay in one block, where sorting the ids would put a
    core's two threads (often cpu i and i + N) into two processes' blocks."""
    topology = topology or {}
    cores = sorted(cores, key=lambda cpu: (*topology.get(cpu, (0, cpu)), cpu))
    if local_world_size < 1 or not 0 <= local_rank < local_world_size or len(cores) < local_world_size:
        return None
    size, extra = divmod(len(cores), local_world_size)
    start = local_rank * size + min(local_rank, extra)
    return cores[start : start + size + (local_rank < extra)]


def cpu_topology(cpus) -> dict:
    """CPU -> (package, core) from ``/sys/devices/system/cpu`` (empty where
    it cannot be read: then CPUs are taken in id order)."""
    topology = {}
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as package, open(base + "core_id") as core:
                topology[cpu] = (int(package.read()), int(core.read()))
        except (OSError, ValueError):
            return {}
    return topology


def pin_to_cores(local_rank: int, local_world_size: int) -> Optional[List[int]]:
    """Pins this process (its threads, and what it starts later: threads,
    the data worker) to its own block of the CPUs it may run on
    (``core_block``).

    Unpinned, the host's processes and their data workers wander between
    the cores at every wait of their collectives, and each arrives to caches
    the other filled: on the main job (2 processes, 2 cores) pinning made
    the step 12% shorter and the data worker cost nothing
    (benchmarks/bench_data.py). Returns the block, or None (nothing pinned:
    more processes than CPUs, or no CPU affinity on this platform)."""
    if not hasattr(os, "sched_setaffinity") or local_world_size < 2:
        return None
    cpus = os.sched_getaffinity(0)
    block = core_block(cpus, local_rank, local_world_size, cpu_topology(cpus))
    if block is None:
        return None
    try:  # every thread already running (a process group's), not only this one
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, block)
        except OSError:  # it has ended (or may not be moved): it keeps its CPUs
            if tid in (0, threading.get_native_id()):
                raise
    return block


# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold 64-bit glibc accepted before 2.35 (HEAP_MAX_SIZE / 2).
_OLD_GLIBC_MMAP_THRESHOLD = 32 << 20
# Settings of the user's own that keep_freed_memory leaves alone: glibc's
# tunables, or another allocator preloaded in its place.
_ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def keep_freed_memory(mmap_threshold_bytes: int = 64 << 20, trim_threshold_bytes: int = 1 << 30) -> int:
    """Makes glibc's malloc keep the memory a training step frees for the
    next step, instead of handing it back to the kernel.

    A step allocates and frees the same large tensors every time
    (activations, gradients, the all-to-alls' buffers). By default glibc
    maps a block above its mmap threshold (adaptive, 128 KiB up to 32 MiB)
    afresh and unmaps it when freed, and gives the top of its heap back
    beyond the trim threshold, so each step writes into pages the kernel
    must fault in and zero again: on the sharded multihot step of
    benchmarks/bench_sharded.py, 1,000-2,700 page faults and 6-10 ms of
    system time a step per process. With this, the main heap serves blocks
    up to ``mmap_threshold_bytes`` (larger ones, such as tables, are still
    mapped on their own) and keeps up to ``trim_threshold_bytes`` of free
    memory: the process's resident memory stays near its peak. (Other
    threads' arenas, 64 MiB heaps, still unmap a heap that empties.)

    Process-wide, for what is allocated from then on. Returns the mmap
    threshold it set: ``mmap_threshold_bytes``, or 32 MiB where glibc
    refuses more (before 2.35); 0, changing nothing, where the C library is
    not glibc, where the user set glibc's malloc tunables
    (``MALLOC_*_``, ``GLIBC_TUNABLES``) or preloaded another allocator
    (``LD_PRELOAD``: jemalloc, tcmalloc), or where glibc refuses both."""
    for name, value in (("mmap_threshold_bytes", mmap_threshold_bytes), ("trim_threshold_bytes", trim_threshold_bytes)):
        if not 0 < value < 2**31:
            raise ValueError(f"Invalid {name}={value}. Must be in [1, 2**31 - 1] (mallopt takes an int).")
    if _allocator_set_up_by_user():
        return 0
    if not is_glibc():
        return 0
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for threshold in dict.fromkeys((mmap_threshold_bytes, min(mmap_threshold_bytes, _OLD_GLIBC_MMAP_THRESHOLD))):
        if mallopt(_M_MMAP_THRESHOLD, threshold):
            mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes)
            return threshold
    return 0


def is_glibc() -> bool:
    """Whether this process runs on glibc (not musl, macOS or Windows)."""
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):
        return False


def _allocator_set_up_by_user() -> bool:
    return (
        any(os.environ.get(name) for name in _ALLOCATOR_SETTINGS)
        or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
        or re.search(r"jemalloc|tcmalloc|mimalloc", os.environ.get("LD_PRELOAD", "")) is not None
    )


def setup_environment(config: TrainConfig) -> Environment:
    """Joins the job's default process group when launched by torchrun
    (``dist_rec.distributed.init_process_group``, every collective bounded
    by ``fault.timeout_s``), or becomes a member of a fault-tolerant job
    (joined later: ``join_first_epoch``); picks the device, the backend and
    the thread count, pins the process and sets up its allocator
    (``train.pin_cores``, ``train.keep_freed_memory``)."""
    run = config.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    use_cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("Invalid train.device='cuda'. Must be 'cpu' or 'auto' on a machine without a GPU.")
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = run.backend if run.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("Invalid train.backend='nccl'. Must be 'gloo' or 'auto' when training on the CPU.")
    from dist_rec.fault.member import ENV_STORE, FaultMember

    if run.keep_freed_memory:
        keep_freed_memory()
    threads = run.threads or default_threads(local_world_size)  # of the host's share, before pinning
    # Only where torchrun says where this process stands among the host's; not under the
    # fault-tolerant launcher, whose spares take the place of a rank of any local rank.
    if run.pin_cores and "LOCAL_RANK" in os.environ and "LOCAL_WORLD_SIZE" in os.environ and ENV_STORE not in os.environ:
        pin_to_cores(local_rank, local_world_size)
    torch.set_num_threads(threads)
    member = FaultMember.from_env(config.fault, config.sharding.replicas, config.sharding.layout, run.output_dir or None)
    if member is not None:
        if backend == "nccl":
            raise ConfigError("Invalid train.backend='nccl' under dist_rec.fault.launch. Must be 'gloo' (recovery re-forms gloo groups).")
        return Environment(rank, world_size, local_world_size, backend, device, member=member)
    env = Environment(rank, world_size, local_world_size, backend if world_size > 1 else None, device)
    if env.distributed and not dist.is_initialized():
        init_process_group(backend, timeout_s=config.fault.timeout_s)
    return env


def join_first_epoch(env: Environment, config: TrainConfig):
    """Under the fault-tolerant launcher: joins the first epoch that takes
    this process and its default group (keyed by the epoch). Returns the
    epoch (None without the launcher)."""
    member = env.member
    if member is None:
        return None
    _import_ahead()
    epoch = member.join("fresh")  # a spare first waits here for the rank it replaces
    env.data_rank, env.data_world_size = member.rank, member.world_size
    env.rank, env.world_size = epoch.rank_of(member.rank), epoch.world_size
    init_process_group(env.backend, rank=env.rank, world_size=env.world_size, store=member.store.client,
                       timeout_s=config.fault.timeout_s, prefix=epoch.prefix)  # fmt: skip
    return epoch


def _import_ahead() -> None:
    """Imports what the first DDP wrap imports lazily (``torch._dynamo``:
    1-1.5 s here) before joining: a spare does it while it waits, not after
    it takes a dead rank's place."""
    import torch._dynamo  # noqa: F401
