"""Optimizers: fused sparse optimizers for embedding tables."""

from dist_rec.optim.fused import FusedOptimizer, MomentumScaledRowWiseAdagrad, RowWiseAdagrad, SGD

__all__ = ["FusedOptimizer", "MomentumScaledRowWiseAdagrad", "RowWiseAdagrad", "SGD"]
