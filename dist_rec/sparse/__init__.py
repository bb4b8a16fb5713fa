"""Jagged batch types (TorchRec-compatible)."""

from dist_rec.sparse.jagged_tensor import FeatureBlocks, JaggedTensor, KeyedJaggedTensor, KeyedTensor

__all__ = ["FeatureBlocks", "JaggedTensor", "KeyedJaggedTensor", "KeyedTensor"]
