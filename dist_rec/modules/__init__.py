"""Unsharded embedding modules and their configs."""

from dist_rec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from dist_rec.modules.embedding_modules import EmbeddingBagCollection

__all__ = ["DataType", "EmbeddingBagCollection", "EmbeddingBagConfig", "PoolingType"]
