"""Python face of the shared-memory flag ops (``csrc/comm/shm_flags.cpp``).

The intra-host all-to-all (``dist_rec.distributed.shm_transport``) keeps
its counters and doorbells as int32 words of a mapped ``/dev/shm`` segment.
These ops give those words the memory ordering the protocol needs (release
stores, acquire loads) and let a rank sleep on a doorbell (a shared futex)
instead of spinning."""

from __future__ import annotations

import torch

import dist_rec._C  # noqa: F401  registers torch.ops.dist_rec._shm_*

_ops = torch.ops.dist_rec


def shm_store(flags: torch.Tensor, index: int, value: int) -> None:
    """Publishes ``value`` in word ``index`` after every earlier write of this thread."""
    _ops._shm_store(flags, index, value)


def shm_load(flags: torch.Tensor, index: int) -> int:
    """Word ``index``, ordered before the reads that follow."""
    return _ops._shm_load(flags, index)


def shm_ring(flags: torch.Tensor, index: int) -> None:
    """Increments doorbell ``index`` and wakes whoever sleeps on it."""
    _ops._shm_ring(flags, index)


def shm_sleep(flags: torch.Tensor, index: int, seen: int, timeout_ms: int) -> int:
    """Sleeps while doorbell ``index`` reads ``seen`` (at most ``timeout_ms``); its value then."""
    return _ops._shm_sleep(flags, index, seen, timeout_ms)
