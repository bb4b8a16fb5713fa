"""Where embedding rows live, behind one interface.

* ``EmbeddingLocation``: the placement vocabulary a plan carries per shard.
* ``EmbeddingStorage``: the only door to a group of tables' rows and
  row-wise optimizer state (lookup, fused update, prefetch, rows by id,
  blocks for sync and checkpoints); ``TableSpec`` describes one table.
* ``InMemoryStorage``: whole tensors in the rank's memory (the kernels get
  raw pointers); ``StagedStorage``: the kernels on compact copies of the
  rows a batch touches, for storages that are not one tensor;
  ``MemmapStorage``: rows in memory-mapped files.
* ``create_storage``: the storage a location asks for (TorchRec picks a
  compute kernel per table group the same way).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from dist_rec.placement.in_memory import InMemoryStorage
from dist_rec.placement.location import EmbeddingLocation
from dist_rec.placement.memmap import MemmapStorage
from dist_rec.placement.staged import StagedStorage
from dist_rec.placement.storage import EmbeddingStorage, TableSpec, staged_ids


def create_storage(
    location,
    tables: Sequence[TableSpec],
    state_names: Sequence[str],
    device: torch.device,
    directory: Optional[str] = None,
) -> EmbeddingStorage:
    """The storage for rows placed at ``location``.

    ``DEVICE`` is ``InMemoryStorage`` on ``device``; ``HOST`` too on a CPU
    rank (host memory is its own); ``SSD`` is ``MemmapStorage`` under
    ``directory``, which must then be given."""
    location = EmbeddingLocation.from_str(location)
    device = torch.device(device)
    names = [t.name for t in tables]
    if location == EmbeddingLocation.DEVICE or (location == EmbeddingLocation.HOST and device.type == "cpu"):
        return InMemoryStorage(tables, state_names, device)
    if location == EmbeddingLocation.SSD:
        if device.type != "cpu":
            raise NotImplementedError(f"Tables {names} at location 'ssd' on {device}: memory-mapped tables serve CPU ranks.")
        if not directory:
            raise ValueError(
                f"Tables {names} are placed at location 'ssd', but no storage directory was given "
                "(storage_dir= of the sharded collection)."
            )
        return MemmapStorage(tables, state_names, device, directory)
    raise NotImplementedError(f"Tables {names} at location {location.value!r} on {device} are not supported yet.")


__all__ = [
    "EmbeddingLocation",
    "EmbeddingStorage",
    "InMemoryStorage",
    "MemmapStorage",
    "StagedStorage",
    "TableSpec",
    "create_storage",
    "staged_ids",
]
