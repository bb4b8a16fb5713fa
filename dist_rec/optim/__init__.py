"""Optimizers: fused sparse optimizers for embedding tables, and distributed
Shampoo for the dense layers."""

from dist_rec.optim.fused import FusedOptimizer, MomentumScaledRowWiseAdagrad, RowWiseAdagrad, SGD
from dist_rec.optim.shampoo import DDPShampooConfig, DistributedShampoo

__all__ = [
    "DDPShampooConfig",
    "DistributedShampoo",
    "FusedOptimizer",
    "MomentumScaledRowWiseAdagrad",
    "RowWiseAdagrad",
    "SGD",
]
