"""dist_rec: fused, sharded embedding training for recommendation models.

The names a TorchRec user reaches for first are here::

    from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
    from dist_rec.optim import RowWiseAdagrad
"""

from dist_rec.modules import DataType, EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from dist_rec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor

__version__ = "0.1.0"

__all__ = [
    "DataType",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "JaggedTensor",
    "KeyedJaggedTensor",
    "KeyedTensor",
    "PoolingType",
]
