"""Random multi-table lookup problems for tests of the pooled-embedding ops.

A problem is everything one op call takes: tables, the feature-slot layout,
jagged ids. The generator covers what the kernels must get right: several
tables of different widths, features sharing a table, feature slots in a
different order from the output columns, empty bags, an empty batch,
repeated ids (small tables), per-sample weights, sum and mean pooling,
int32 and int64 ids, and 16-bit storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class LookupProblem:
    weights: List[torch.Tensor]
    feature_table: List[int]
    feature_pooling: List[int]
    feature_column: List[int]
    indices: torch.Tensor
    offsets: torch.Tensor
    per_sample_weights: Optional[torch.Tensor]
    batch: int

    @property
    def layout(self):
        return self.feature_table, self.feature_pooling, self.feature_column

    @property
    def out_dim(self) -> int:
        return sum(self.weights[t].shape[1] for t in self.feature_table)

    def op_args(self):
        """Positional arguments of the forward op."""
        return (self.weights, *self.layout, self.indices, self.offsets, self.per_sample_weights)

    def clone_weights(self, dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
        return [w.clone() if dtype is None else w.to(dtype, copy=True) for w in self.weights]


def random_problem(
    seed: int,
    *,
    num_tables: int = 3,
    max_rows: int = 60,
    dims: Optional[List[int]] = None,
    batch: int = 7,
    max_bag: int = 6,
    weighted: bool = False,
    pooling: str = "mixed",
    index_dtype: torch.dtype = torch.int64,
    weight_dtype: torch.dtype = torch.float32,
    empty_bag_fraction: float = 0.2,
) -> LookupProblem:
    """A random problem; ``pooling`` is "sum", "mean" or "mixed"."""
    g = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=g))

    if dims is None:
        dims = [[1, 3, 4, 8, 13, 16, 24, 32, 64, 128][randint(0, 10)] for _ in range(num_tables)]
    if len(dims) != num_tables:
        raise ValueError(f"random_problem: {len(dims)} dims {dims} for num_tables={num_tables}")
    rows = [randint(1, max_rows + 1) for _ in range(num_tables)]
    weights = [
        (torch.rand(r, d, generator=g, dtype=torch.float64) * 2 - 1).to(weight_dtype) for r, d in zip(rows, dims)
    ]
    # Every table gets a feature; a few tables get a second one (shared table).
    feature_table = list(range(num_tables)) + [t for t in range(num_tables) if randint(0, 3) == 0]
    num_features = len(feature_table)
    if pooling == "mixed":
        feature_pooling = [randint(0, 2) for _ in range(num_features)]
    else:
        feature_pooling = [int(pooling == "mean")] * num_features
    # Output columns in a shuffled order of the slots.
    column_order = torch.randperm(num_features, generator=g).tolist()
    feature_column = [0] * num_features
    column = 0
    for f in column_order:
        feature_column[f] = column
        column += dims[feature_table[f]]

    lengths = torch.randint(0, max_bag + 1, (num_features * batch,), generator=g)
    lengths[torch.rand(num_features * batch, generator=g) < empty_bag_fraction] = 0
    ids = []
    for f in range(num_features):
        n = int(lengths[f * batch : (f + 1) * batch].sum())
        ids.append(torch.randint(0, rows[feature_table[f]], (n,), generator=g))
    indices = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
    offsets = torch.zeros(num_features * batch + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    psw = torch.rand(len(indices), generator=g) * 2 if weighted else None
    return LookupProblem(
        weights=weights,
        feature_table=feature_table,
        feature_pooling=feature_pooling,
        feature_column=feature_column,
        indices=indices.to(index_dtype),
        offsets=offsets.to(index_dtype),
        per_sample_weights=psw,
        batch=batch,
    )


def redraw_batch(problem: LookupProblem, seed: int, *, max_bag: int = 6, empty_bag_fraction: float = 0.2) -> LookupProblem:
    """The same tables and feature layout with a new random batch of ids
    (and per-sample weights, if the problem has them): the next step."""
    g = torch.Generator().manual_seed(seed)
    num_features = len(problem.feature_table)
    batch = problem.batch
    lengths = torch.randint(0, max_bag + 1, (num_features * batch,), generator=g)
    lengths[torch.rand(num_features * batch, generator=g) < empty_bag_fraction] = 0
    ids = []
    for f in range(num_features):
        n = int(lengths[f * batch : (f + 1) * batch].sum())
        ids.append(torch.randint(0, problem.weights[problem.feature_table[f]].shape[0], (n,), generator=g))
    indices = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
    offsets = torch.zeros(num_features * batch + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    weighted = problem.per_sample_weights is not None
    return LookupProblem(
        weights=problem.weights,
        feature_table=problem.feature_table,
        feature_pooling=problem.feature_pooling,
        feature_column=problem.feature_column,
        indices=indices.to(problem.indices.dtype),
        offsets=offsets.to(problem.offsets.dtype),
        per_sample_weights=torch.rand(len(indices), generator=g) * 2 if weighted else None,
        batch=batch,
    )
