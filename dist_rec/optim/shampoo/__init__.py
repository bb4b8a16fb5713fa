"""Distributed Shampoo for dense parameters (see docs/shampoo.md)."""

from dist_rec.optim.shampoo.blocking import Block, merged_shape, param_blocks
from dist_rec.optim.shampoo.distributor import DDPShampooConfig, assign_blocks
from dist_rec.optim.shampoo.matrix_functions import inverse_root
from dist_rec.optim.shampoo.optimizer import GRAFTING_TYPES, DistributedShampoo

__all__ = [
    "Block",
    "DDPShampooConfig",
    "DistributedShampoo",
    "GRAFTING_TYPES",
    "assign_blocks",
    "inverse_root",
    "merged_shape",
    "param_blocks",
]
