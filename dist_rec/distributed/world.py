"""The job's default process group: joining it, and forming it again.

Every process joins the default group through ``init_process_group``
here, not torch's directly: it keeps the rendezvous store, so that the
group can later be destroyed and formed again in the same processes (a
rank died and a replacement joined, or a test tears the groups down) on a
fresh key prefix of the same store. Keys of an old generation are never
read by a new one.

Under ``torchrun`` the store is the one ``env://`` rendezvous gives (the
agent's, or rank 0's with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``);
without it, callers pass ``rank``, ``world_size`` and ``MASTER_ADDR`` /
``MASTER_PORT`` as torch expects. Under the fault-tolerant launcher
(``dist_rec.fault``) the store is the launcher's, which outlives any
worker, and each membership epoch names its own prefix: a replacement
process and the survivors it joins then meet on the same keys whatever
their histories.

Every collective of the default group (and of the groups made after it
with ``group_timeout``) waits at most ``timeout_s``: a dead or hung peer
becomes an error, never a hang.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Callable, NoReturn, Optional

import torch.distributed as dist


@dataclass
class _World:
    store: Optional[dist.Store] = None  # the rendezvous store, unprefixed
    backend: str = "gloo"
    timeout: Optional[datetime.timedelta] = None
    generation: int = 0
    prefix: str = ""  # the current default group's key prefix in the store


_WORLD = _World()


def _as_timeout(seconds: Optional[float]) -> Optional[datetime.timedelta]:
    return None if seconds is None else datetime.timedelta(seconds=float(seconds))


def init_process_group(
    backend: str = "gloo",
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    store: Optional[dist.Store] = None,
    timeout_s: Optional[float] = None,
    prefix: Optional[str] = None,
) -> None:
    """Joins the job's default process group (a collective over the job).

    Args:
        backend: "gloo" or "nccl".
        rank, world_size: this process's place; from the environment
            (``RANK``, ``WORLD_SIZE``) when None.
        store: a store every process reaches; the ``env://`` rendezvous
            store (``MASTER_ADDR``, ``MASTER_PORT``) when None.
        timeout_s: how long a collective may wait for a peer (torch's
            default, 30 minutes for gloo, when None).
        prefix: the group's key prefix in the store (a membership epoch's
            name); ``dist_rec/generation0`` when None.
    """
    if dist.is_initialized():
        raise RuntimeError("init_process_group: this process already belongs to a default process group.")
    timeout = _as_timeout(timeout_s)
    if store is None:
        kwargs = {"timeout": timeout} if timeout is not None else {}
        store, rank, world_size = next(dist.rendezvous("env://", rank=-1 if rank is None else rank,
                                                       world_size=-1 if world_size is None else world_size, **kwargs))
    if rank is None or world_size is None:
        raise ValueError(f"Invalid rank={rank}, world_size={world_size}. Must both be given along with a store.")
    _WORLD.store, _WORLD.backend, _WORLD.timeout, _WORLD.generation = store, backend, timeout, 0
    _join(rank, world_size, prefix)


def init_single_process_group() -> None:
    """A default group of this process alone (gloo, in-memory store): what
    collective code needs to run in one process (checkpoints, tests)."""
    init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())


def reform_process_group(rank: int, world_size: int, store: Optional[dist.Store] = None, prefix: Optional[str] = None) -> None:
    """Destroys every process group of this process and joins a new default
    group of ``world_size`` ranks as ``rank``, on a fresh prefix of the same
    store (or of ``store``; ``prefix`` names it, the next generation's when
    None): a collective over the new membership. Only
    ``ProcessGroups.rebuild`` calls this: it re-forms the sub-groups after."""
    if _WORLD.store is None:
        if not dist.is_initialized():
            raise RuntimeError("reform_process_group: no default process group to re-form.")
        # Joined through torch directly: keep going on the store it used.
        _WORLD.store = dist.distributed_c10d._get_default_store()
        _WORLD.backend = str(dist.get_backend())
    if dist.is_initialized():
        dist.destroy_process_group()
    if store is not None:
        _WORLD.store = store
    _WORLD.generation += 1
    _join(rank, world_size, prefix)


def destroy_process_group() -> None:
    """Leaves every process group; the store is forgotten too."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD.store, _WORLD.generation = None, 0


def generation() -> int:
    """How many times the default group was re-formed (0: never)."""
    return _WORLD.generation


def group_timeout() -> Optional[datetime.timedelta]:
    """The default group's collective timeout, for the groups made after it
    (``new_group`` does not inherit it)."""
    return _WORLD.timeout


def store() -> Optional[dist.Store]:
    """The store the default group was formed on (unprefixed)."""
    return _WORLD.store


def _join(rank: int, world_size: int, prefix: Optional[str] = None) -> None:
    _WORLD.prefix = prefix if prefix is not None else f"dist_rec/generation{_WORLD.generation}"
    prefixed = dist.PrefixStore(_WORLD.prefix, _WORLD.store)
    kwargs = {"timeout": _WORLD.timeout} if _WORLD.timeout is not None else {}
    dist.init_process_group(_WORLD.backend, store=prefixed, rank=rank, world_size=world_size, **kwargs)


def exit_process(code: int) -> NoReturn:
    """Ends the process once its output is flushed, without the
    interpreter's teardown. Teardown races the C++ threads of gloo and of
    the TCP store: a gloo worker thread that drops the last reference to a
    finished collective's tensor needs the GIL, a coordinator thread may sit
    in a store call; once finalisation has begun such a thread is ended by
    force, which aborts the process (``terminate called without an active
    exception``) after a run that succeeded. torchrun (or a benchmark) then
    reports the job as failed, and another node waits at its exit barrier.
    Everything the caller writes must be closed before this."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_command(main: Callable[[], int]) -> NoReturn:
    """Runs a command's ``main()`` and ends the process with its exit code
    through ``exit_process``: an uncaught error is printed as the
    interpreter would and exits 1, Ctrl-C exits 130."""
    try:
        code = main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 -- printed as the interpreter would, then the same exit code
        import traceback

        traceback.print_exc()
        code = 1
    exit_process(code)

