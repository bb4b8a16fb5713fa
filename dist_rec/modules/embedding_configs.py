"""Table configuration, with TorchRec's field names and enum values.

TorchRec's own ``torchrec.EmbeddingBagConfig`` objects are accepted wherever
ours are (``as_embedding_bag_config`` converts them), so a model definition
can move between the libraries unchanged.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch


class PoolingType(enum.Enum):
    SUM = "SUM"
    MEAN = "MEAN"


class DataType(enum.Enum):
    """Storage type of a table's rows; lookups always accumulate in float32."""

    FP32 = "FP32"
    FP16 = "FP16"
    BF16 = "BF16"


DATA_TYPE_TO_DTYPE = {
    DataType.FP32: torch.float32,
    DataType.FP16: torch.float16,
    DataType.BF16: torch.bfloat16,
}


@dataclass
class EmbeddingBagConfig:
    """One embedding table and the features that look it up.

    Args:
        num_embeddings (int): rows of the table.
        embedding_dim (int): width of a row.
        name (str): table name, unique in a collection; state_dict keys use it.
        feature_names (List[str]): features pooled from this table. Several
            features may share one table; each gets its own output columns.
        pooling (PoolingType): SUM or MEAN over a bag. (Default: SUM)
        data_type (DataType): FP32, FP16 or BF16 storage. (Default: FP32)
        weight_init_min (Optional[float]): lower bound of the uniform init.
            (Default: -sqrt(1 / num_embeddings), as TorchRec)
        weight_init_max (Optional[float]): upper bound. (Default: sqrt(1 / num_embeddings))

    Example::

        EmbeddingBagConfig(name="t0", embedding_dim=64, num_embeddings=10_000, feature_names=["f0", "f1"])
    """

    num_embeddings: int
    embedding_dim: int
    name: str = ""
    feature_names: List[str] = field(default_factory=list)
    pooling: PoolingType = PoolingType.SUM
    data_type: DataType = DataType.FP32
    weight_init_min: Optional[float] = None
    weight_init_max: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_embeddings, int) or self.num_embeddings <= 0:
            raise ValueError(f"Invalid num_embeddings={self.num_embeddings!r} for table {self.name!r}. Must be an int > 0.")
        if not isinstance(self.embedding_dim, int) or self.embedding_dim <= 0:
            raise ValueError(f"Invalid embedding_dim={self.embedding_dim!r} for table {self.name!r}. Must be an int > 0.")
        if not self.name:
            raise ValueError("Invalid name=''. Must be a non-empty table name.")
        if not self.feature_names:
            raise ValueError(f"Invalid feature_names=[] for table {self.name!r}. Must name at least one feature.")
        self.pooling = _coerce_enum(PoolingType, self.pooling, "pooling", self.name)
        self.data_type = _coerce_enum(DataType, self.data_type, "data_type", self.name)
        if self.weight_init_min is None:
            self.weight_init_min = -math.sqrt(1.0 / self.num_embeddings)
        if self.weight_init_max is None:
            self.weight_init_max = math.sqrt(1.0 / self.num_embeddings)
        if self.weight_init_min > self.weight_init_max:
            raise ValueError(
                f"Invalid weight_init_min={self.weight_init_min} > weight_init_max={self.weight_init_max} "
                f"for table {self.name!r}."
            )

    @property
    def dtype(self) -> torch.dtype:
        return DATA_TYPE_TO_DTYPE[self.data_type]


def _coerce_enum(enum_type, value, name: str, table: str):
    """Accepts our enum, TorchRec's enum of the same name, or its string value."""
    raw = getattr(value, "value", value)
    try:
        return enum_type(raw)
    except ValueError:
        allowed = ", ".join(e.value for e in enum_type)
        raise ValueError(f"Invalid {name}={value!r} for table {table!r}. Must be one of {allowed}.") from None


def as_embedding_bag_config(config: Any) -> EmbeddingBagConfig:
    """Our config from ours or from TorchRec's ``EmbeddingBagConfig``."""
    if isinstance(config, EmbeddingBagConfig):
        return config
    try:
        return EmbeddingBagConfig(
            num_embeddings=config.num_embeddings,
            embedding_dim=config.embedding_dim,
            name=config.name,
            feature_names=list(config.feature_names),
            pooling=getattr(config, "pooling", PoolingType.SUM),
            data_type=getattr(config, "data_type", DataType.FP32),
            weight_init_min=getattr(config, "weight_init_min", None),
            weight_init_max=getattr(config, "weight_init_max", None),
        )
    except AttributeError as e:
        raise TypeError(f"Invalid table config {config!r}: not an EmbeddingBagConfig ({e}).") from None
