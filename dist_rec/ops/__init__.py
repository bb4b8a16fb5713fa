"""Python face of the native ops (``torch.ops.dist_rec``) and their references,
and the fused MLP (``fused_mlp``: PyTorch ops, one autograd node)."""

from dist_rec.ops.bucketize import bucketize_by_rows
from dist_rec.ops.embedding_bag import (
    PoolingMode,
    WeightDecayMode,
    embedding_bag_backward_row_grad,
    embedding_bag_forward,
    empty_hugepage,
    set_cpu_isa,
    set_index_checks,
    supported_cpu_isas,
)
from dist_rec.ops.fused_lookup import fused_lookup
from dist_rec.ops.id_range import first_id_out_of_range
from dist_rec.ops.mlp import fused_mlp, mlp_reference

__all__ = [
    "PoolingMode",
    "WeightDecayMode",
    "bucketize_by_rows",
    "embedding_bag_backward_row_grad",
    "embedding_bag_forward",
    "empty_hugepage",
    "first_id_out_of_range",
    "fused_lookup",
    "fused_mlp",
    "mlp_reference",
    "set_cpu_isa",
    "set_index_checks",
    "supported_cpu_isas",
]
