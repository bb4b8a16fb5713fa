"""Python face of ``dist_rec::first_id_out_of_range`` (``csrc/sharding/id_range_cpu.cpp``).

The sharded collections refuse an id outside its table on the rank that
owns the sample, before any id travels. The op finds the first such id in
one pass over a batch; ``first_id_out_of_range_reference`` is its tensor-op
form, used on other devices and as its reference.
"""

from __future__ import annotations

import torch

import dist_rec._C  # noqa: F401  registers torch.ops.dist_rec.first_id_out_of_range


def first_id_out_of_range(ids_N: torch.Tensor, counts_F: torch.Tensor, limits_F: torch.Tensor) -> int:
    """Position of the first id (feature-major ``ids_N``, ``counts_F[f]`` ids
    of feature f) outside ``[0, limits_F[f])``, or -1 if every id is in range."""
    if ids_N.device.type != "cpu" or ids_N.dtype not in (torch.int64, torch.int32):
        return first_id_out_of_range_reference(ids_N, counts_F, limits_F)
    return torch.ops.dist_rec.first_id_out_of_range(
        ids_N.contiguous(), counts_F.to(torch.int64).contiguous(), limits_F.to(torch.int64).contiguous()
    )


def first_id_out_of_range_reference(ids_N: torch.Tensor, counts_F: torch.Tensor, limits_F: torch.Tensor) -> int:
    if ids_N.numel() == 0:
        return -1
    per_id_limit = limits_F.repeat_interleave(counts_F, output_size=ids_N.numel())
    bad = (ids_N < 0) | (ids_N >= per_id_limit)
    return int(bad.nonzero()[0]) if bool(bad.any()) else -1
