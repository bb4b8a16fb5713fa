"""Sharded checkpoints of a ``DistributedModelParallel`` model.

``save_checkpoint`` writes one file per shard (weights and row-wise
optimizer state), one per data-parallel table, the dense state and a
manifest with every file's rectangle, tensors, size and sha256, into a
temporary sibling that is renamed into place when complete.
``load_checkpoint`` verifies everything before touching the model and
reshards on the way in: the loading world, plans and 2D grid may differ
from the saving ones. ``restore_local_shards`` reloads one rank's shards
alone (the hook for partial recovery). See ``docs/checkpoint.md``.
"""

from dist_rec.checkpoint.checkpoint import dense_state_dict, load_checkpoint, resolve_chain, restore_local_shards, save_checkpoint
from dist_rec.checkpoint.files import CheckpointError
from dist_rec.checkpoint.manifest import FORMAT_VERSION, read_manifest
from dist_rec.checkpoint.reader import CheckpointReader

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointReader",
    "dense_state_dict",
    "load_checkpoint",
    "read_manifest",
    "resolve_chain",
    "restore_local_shards",
    "save_checkpoint",
]
