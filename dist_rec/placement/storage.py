"""``EmbeddingStorage``: the only door to a group of tables' rows and their
row-wise optimizer state.

A storage holds the rows of the tables (or shards) that one fused lookup
serves together, and the fused optimizer's per-row state. Everything that
reads or changes them goes through it:

* the pooled lookup (``forward``) and the update fused into its backward
  (``fused_update``), plus the two backward pieces other update rules need
  (``row_grads``, ``per_sample_weights_grad``);
* ``prefetch(ids)``, called as soon as a batch's ids are known (a tier that
  moves rows ahead of the lookup does it there; a no-op in memory);
* rows by id (``read_rows`` / ``write_rows``): updates made outside the
  kernels (column-wise blocks agreeing on a row's state);
* contiguous blocks (``read_block`` / ``write_block``): initialisation,
  replica sync and checkpoints. ``read_block`` hands out live views where
  the storage can (in memory) and copies elsewhere; callers that change a
  block always hand it back with ``write_block``, which is free for a view.

Layout arguments are the kernels' (``csrc/embedding_bag/embedding_bag_ops.cpp``):
``layout = (feature_table, feature_pooling, feature_column)`` per feature
slot of the feature-major jagged input ``indices`` / ``offsets``.

Shape legend: B batch, F feature slots, N indices, U unique rows, D dim.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from dist_rec.placement.location import EmbeddingLocation

# (feature_table, feature_pooling, feature_column) of one lookup call.
Layout = Tuple[List[int], List[int], List[int]]
Block = Tuple[torch.Tensor, Dict[str, torch.Tensor]]  # (weight [n, D], {state name: [n]})


@dataclass(frozen=True)
class TableSpec:
    """One table (or shard) a storage holds."""

    name: str
    num_rows: int
    dim: int
    dtype: torch.dtype = torch.float32


class EmbeddingStorage(abc.ABC):
    """Rows and row-wise optimizer state of ``tables``, looked up together.

    Args:
        tables (Sequence[TableSpec]): the tables, in the order the layout's
            ``feature_table`` numbers them.
        state_names (Sequence[str]): the fused optimizer's per-row states
            (float32, one value per row), e.g. ``("momentum1",)``.
        device (torch.device): where lookups run and their outputs live.
    """

    location: ClassVar[EmbeddingLocation]

    def __init__(self, tables: Sequence[TableSpec], state_names: Sequence[str], device: torch.device) -> None:
        if not tables:
            raise ValueError("Invalid tables=[]. A storage holds at least one table.")
        self.tables: List[TableSpec] = list(tables)
        self.state_names: Tuple[str, ...] = tuple(state_names)
        self.device = torch.device(device)

    @property
    def num_tables(self) -> int:
        return len(self.tables)

    def table_index(self, name: str) -> int:
        for t, spec in enumerate(self.tables):
            if spec.name == name:
                return t
        raise KeyError(f"No table {name!r} in this storage; it holds {[s.name for s in self.tables]}.")

    # -- lookups and the fused update -----------------------------------------

    @abc.abstractmethod
    def forward(self, layout: Layout, indices_N, offsets, per_sample_weights_N) -> torch.Tensor:
        """Pooled rows ``[B, sum of dims]`` (float32), as ``embedding_bag_forward``."""

    @abc.abstractmethod
    def fused_update(self, optimizer, layout: Layout, indices_N, offsets, per_sample_weights_N, grad_output_BD) -> None:
        """One step of the fused ``optimizer`` on every row the batch touched, in place."""

    def fused_update_refuses_non_finite(self, optimizer, grad_output_BD: torch.Tensor) -> bool:
        """Whether ``fused_update`` itself raises, before it changes a row or
        any state, when the gradient holds NaN or inf (then callers need not
        test it first)."""
        return False

    @abc.abstractmethod
    def row_grads(
        self, layout: Layout, indices_N, offsets, per_sample_weights_N, grad_output_BD
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per table: the sorted unique ids the batch touched ``[U]`` and each
        row's gradient summed over the batch ``[U, D]`` (float32)."""

    @abc.abstractmethod
    def per_sample_weights_grad(self, layout: Layout, indices_N, offsets, grad_output_BD) -> torch.Tensor:
        """Gradient of the pooled output with respect to the per-id weights ``[N]``."""

    def prefetch(self, layout: Layout, indices_N, offsets) -> None:
        """Called as soon as a batch's ids are known, before its lookup."""

    # -- rows by id -----------------------------------------------------------

    @abc.abstractmethod
    def read_rows(self, table: int, ids_U: torch.Tensor) -> Block:
        """Copies of rows ``ids_U`` of ``table`` and their state."""

    @abc.abstractmethod
    def write_rows(
        self, table: int, ids_U: torch.Tensor, weight_UD: Optional[torch.Tensor] = None,
        state: Optional[Dict[str, torch.Tensor]] = None,
    ) -> None:
        """Stores rows ``ids_U`` (unique ids) of ``table``: the weights if
        given, and each state given."""

    # -- contiguous blocks: initialisation, replica sync, checkpoints ----------

    @abc.abstractmethod
    def read_block(self, table: int, start: int = 0, count: Optional[int] = None) -> Block:
        """Rows ``[start, start + count)`` of ``table`` (all when count is
        None) and their state: live views where the storage can, else copies."""

    @abc.abstractmethod
    def write_block(
        self, table: int, start: int, weight: Optional[torch.Tensor] = None,
        state: Optional[Dict[str, torch.Tensor]] = None,
    ) -> None:
        """Stores ``weight`` (and each state given) as rows from ``start``
        on; a no-op for tensors that are this storage's own views."""

    def reset_(self, init_ranges: Sequence[Tuple[float, float]]) -> None:
        """Every table uniform in its ``(low, high)``, state zero: a fresh start."""
        for t, (low, high) in enumerate(init_ranges):
            spec = self.tables[t]
            weight = torch.empty(spec.num_rows, spec.dim, dtype=spec.dtype, device=self.device).uniform_(low, high)
            state = {name: torch.zeros(spec.num_rows, device=self.device) for name in self.state_names}
            self.write_block(t, 0, weight, state)

    def _check_block(self, table: int, start: int, count: int) -> None:
        rows = self.tables[table].num_rows
        if start < 0 or count < 0 or start + count > rows:
            raise IndexError(
                f"{type(self).__name__}: rows {start}..{start + count - 1} are outside table "
                f"{self.tables[table].name!r} with {rows} rows."
            )

    def __repr__(self) -> str:
        tables = ", ".join(f"{s.name} {s.num_rows}x{s.dim}" for s in self.tables)
        return f"{type(self).__name__}({self.location.value}: {tables})"


def staged_ids(layout: Layout, indices_N: torch.Tensor, offsets: torch.Tensor, tables: Sequence[TableSpec]):
    """The ids a batch touches, per table, and the batch re-addressed to them.

    Returns ``(unique ids per table (sorted), indices into those)``: a lookup
    of compact copies of exactly those rows with the re-addressed indices
    computes what a lookup of the whole tables would, bit for bit (the
    re-addressing keeps every bag's order and every row's occurrence order).
    Ids out of range are refused as the kernels refuse them."""
    feature_table = layout[0]
    num_features = len(feature_table)
    batch = (offsets.numel() - 1) // num_features if num_features else 0
    indices_N = indices_N.to(torch.int64)
    if batch == 0 or indices_N.numel() == 0:
        return [indices_N.new_zeros(0) for _ in tables], indices_N.new_zeros(indices_N.shape)
    bounds = offsets[::batch].to(torch.int64)[: num_features + 1]
    ids_per_feature = (bounds[1:] - bounds[:-1]).tolist()
    table_of_id = torch.repeat_interleave(
        torch.tensor(feature_table, dtype=torch.int64, device=indices_N.device),
        torch.tensor(ids_per_feature, dtype=torch.int64, device=indices_N.device),
        output_size=indices_N.numel(),
    )
    remapped = torch.empty_like(indices_N)
    unique_per_table = []
    for t, spec in enumerate(tables):
        mask = table_of_id == t
        ids = indices_N[mask]
        bad = (ids < 0) | (ids >= spec.num_rows)
        if bool(bad.any()):
            position = int(mask.nonzero()[int(bad.nonzero()[0])])
            feature = int(torch.searchsorted(bounds[1:].contiguous(), torch.tensor(position), right=True))
            bag = int(torch.searchsorted(offsets.to(torch.int64), torch.tensor(position), right=True)) - 1
            raise IndexError(
                f"embedding_bag_forward: id {int(indices_N[position])} at indices[{position}] (feature slot {feature}, "
                f"sample {bag - feature * batch}) is out of range for table {t} with {spec.num_rows} rows; ids must be "
                f"in [0, {spec.num_rows})"
            )
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        remapped[mask] = inverse
        unique_per_table.append(unique)
    return unique_per_table, remapped
