"""Output dist: pooled rows back to the ranks that own the samples, and
the features' columns assembled from them.

``PooledEmbeddingsDist`` is the output side of every sharding type at once.
Each rank sends each sample's pooled slot columns back to the rank that
owns the sample (one all-to-all for all tables, started as soon as the
local lookups are done and waited for as late as possible, so that the
dense layers compute meanwhile). The owner then assembles each feature's
columns from the pieces, by the types' rules (``scheme.py``): column
blocks side by side, row shards' partial sums added (mean pooling divided
after). Two layouts skip the general assembly: row-wise sharding of every
table (the output is the sum of the ranks' blocks: a reduce-scatter,
``start_row_sums``, whose sum and mean division happen as the blocks
arrive) and whole features from one rank each (the received buffer is
handed over as it is, as ``FeatureBlocks``, for an interaction that reads
blocks).

The autograd functions split the all-to-all's backward in two the same
way (see ``start_output_dist``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from dist_rec.modules.embedding_configs import PoolingType
from dist_rec.sharding.comm import all_to_all, all_to_all_blocks, sum_row_shards
from dist_rec.sharding.slots import SlotLayout
from dist_rec.sparse.jagged_tensor import FeatureBlocks, KeyedTensor


class PooledEmbeddingsDist:
    """How this collection's pooled pieces come back and join.

    Args:
        layout (SlotLayout): every rank's slots.
        process_groups: the owner of the sharding group (asked at each call).
    """

    def __init__(self, layout: SlotLayout, process_groups) -> None:
        self.layout = layout
        self.process_groups = process_groups
        self.feature_names, self.feature_dims = layout.feature_names, layout.feature_dims
        self.widths = layout.widths
        self.slot_widths = [[s.shard.num_cols for s in slots] for slots in layout.slots_by_rank]
        has_data_parallel = bool(layout.data_parallel_configs)
        # Pieces come back one per slot, rank-major, then the data-parallel
        # features: per feature, its column groups in column order, each the
        # sum of its row shards.
        piece = 0
        groups: Dict[str, Dict[int, List[int]]] = {f: {} for f in self.feature_names}
        for slots in layout.slots_by_rank:
            for s in slots:
                groups[s.feature].setdefault(s.shard.col_offset, []).append(piece)
                piece += 1
        self.data_parallel_dims: List[int] = []
        for c in layout.data_parallel_configs:
            for f in c.feature_names:
                groups[f][0] = [piece]
                piece += 1
                self.data_parallel_dims.append(c.embedding_dim)
        self.assembly = [[groups[f][col] for col in sorted(groups[f])] for f in self.feature_names]
        # Mean pooling of row-split tables divides after the partial sums are
        # joined; shards that see whole bags pool means themselves.
        configs = layout.configs
        self.mean_features = {
            i for i, f in enumerate(self.feature_names)
            if configs[layout.feature_table[f]].pooling == PoolingType.MEAN and layout.row_split(configs[layout.feature_table[f]].name)
        }
        self.row_sums = self._aligned_row_shards(has_data_parallel)
        self.block_layout = self._features_in_blocks(has_data_parallel)

    def _aligned_row_shards(self, has_data_parallel: bool) -> bool:
        """Whether the output is the plain sum of the ranks' blocks: every
        rank of the group holds one whole-width row shard of every feature,
        in config feature order (row-wise sharding of every table), and no
        feature is data-parallel. Mean-pooled features are divided after."""
        slots_by_rank = self.layout.slots_by_rank
        if has_data_parallel or len(slots_by_rank) < 2:
            return False
        first = [(s.feature, s.shard.col_offset, s.shard.num_cols) for s in slots_by_rank[0]]
        whole = [(f, 0, dim) for f, dim in zip(self.feature_names, self.feature_dims)]
        return first == whole and all(
            [(s.feature, s.shard.col_offset, s.shard.num_cols) for s in slots] == first for slots in slots_by_rank
        )

    def _features_in_blocks(self, has_data_parallel: bool) -> Optional[Tuple[List[int], List[int]]]:
        """``(feature_block, feature_column)`` when every feature's pooled
        columns come back whole from one rank (table-wise, no row or column
        split, no data-parallel table, no mean left to take): the output
        can then be handed over as ``FeatureBlocks``, the received buffer
        as it is. Else None."""
        if has_data_parallel or self.mean_features:
            return None
        dims = dict(zip(self.feature_names, self.feature_dims))
        where: Dict[str, Tuple[int, int]] = {}
        for rank, slots in enumerate(self.layout.slots_by_rank):
            column = 0
            for s in slots:
                if s.feature in where or s.shard.num_cols != dims[s.feature]:
                    return None  # split over shards
                where[s.feature] = (rank, column)
                column += s.shard.num_cols
        if set(where) != set(self.feature_names):
            return None
        return [where[f][0] for f in self.feature_names], [where[f][1] for f in self.feature_names]

    # -- one batch -------------------------------------------------------------

    def start(self, pooled: torch.Tensor, batch_sizes: List[int], mean_counts: Optional[Dict[int, torch.Tensor]] = None):
        """Starts the all-to-all of this rank's ``pooled`` ``[sum_q B_q, W_me]``
        (for row-wise sharding of every table, the reduce-scatter of its
        partial sums, whose mean-pooled features are divided by
        ``mean_counts`` as they are summed): ``(buffer, box)`` for ``output``."""
        group = self.process_groups.sharding_group
        if self.row_sums:
            if self.mean_features and not mean_counts:
                raise ValueError(
                    f"PooledEmbeddingsDist.start: the mean-pooled features {sorted(self.mean_features)} need "
                    "their bag sizes (mean_counts) to be divided as they are summed."
                )
            me = dist.get_rank(group)
            divisor = self._mean_divisor(batch_sizes[me], mean_counts) if mean_counts else None
            return start_row_sums(pooled, batch_sizes, group, divisor)
        return start_output_dist(pooled, batch_sizes, self.widths, group, 1.0 / dist.get_world_size(group))

    def output(
        self,
        received: Optional[torch.Tensor],
        box,
        batch: int,
        data_parallel_pooled: Optional[torch.Tensor],
        mean_counts: Dict[int, torch.Tensor],
    ) -> KeyedTensor:
        """The collection's output for a batch of ``batch`` samples, whose
        pooled rows are still on their way: a ``KeyedTensor`` that waits for
        them when read. ``mean_counts`` holds, per mean-pooled row-split
        feature, its bag sizes (at least 1), as given to ``start``."""
        if self.row_sums:
            mean_counts = {}  # divided as they were summed
        return _PendingKeyedTensor(self, received, box, batch, data_parallel_pooled, mean_counts)

    def assemble(self, joined: Optional[torch.Tensor], batch: int, data_parallel_pooled, mean_counts) -> torch.Tensor:
        """``[B, sum of dims]`` in config feature order from the received
        pieces (``joined``, flat, rank-major) and the data-parallel pooled."""
        if joined is not None and self.row_sums:
            return joined  # summed (and divided) on arrival: ``RowSums``
        pieces: List[torch.Tensor] = []
        if joined is not None:
            blocks = torch.split(joined, [batch * w for w in self.widths])
            for block, width, slot_widths in zip(blocks, self.widths, self.slot_widths):
                pieces.extend(torch.split(block.view(batch, width), slot_widths, dim=1))
        if data_parallel_pooled is not None:
            pieces.extend(torch.split(data_parallel_pooled, self.data_parallel_dims, dim=1))
        columns = []
        for f, groups in enumerate(self.assembly):
            for group in groups:
                column = pieces[group[0]]
                for other in group[1:]:  # row shards: partial sums
                    column = column + pieces[other]
                if f in mean_counts:
                    column = column / mean_counts[f].to(column.dtype)[:, None]
                columns.append(column)
        return torch.cat(columns, dim=1)

    def blocks(self, joined: torch.Tensor) -> FeatureBlocks:
        return FeatureBlocks(list(self.feature_names), joined, list(self.widths), *self.block_layout)

    def _mean_divisor(self, batch: int, mean_counts: Dict[int, torch.Tensor]) -> "_MeanDivisor":
        """What divides the summed ``[B, width]`` output's mean-pooled
        features by their bag sizes: one division for all features, where
        one per feature cost a small op each way."""
        dims = self.feature_dims
        per_feature = torch.ones(batch, len(dims), device=next(iter(mean_counts.values())).device)
        for f, counts in mean_counts.items():
            per_feature[:, f] = counts
        return _MeanDivisor(per_feature, dims)


class _MeanDivisor:
    """Per-sample, per-feature bag sizes spread over the features' columns
    (``[B, F]``, broadcast over ``[B, F, D]`` where the widths are equal)."""

    def __init__(self, per_feature: torch.Tensor, dims: List[int]) -> None:
        self.per_feature, self.dims = per_feature, dims
        self._equal = len(set(dims)) == 1

    def _spread(self, per_feature: torch.Tensor) -> torch.Tensor:
        if self._equal:
            return per_feature[:, :, None]
        return per_feature.repeat_interleave(torch.tensor(self.dims, device=per_feature.device), dim=1)

    def _shaped(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(rows.shape[0], len(self.dims), self.dims[0]) if self._equal else rows

    def divide_rows_(self, rows: torch.Tensor, first: int) -> None:
        """Divides ``rows`` ``[n, width]``, rows ``first..first + n`` of the output, in place."""
        part = self.per_feature[first : first + rows.shape[0]].to(rows.dtype)
        self._shaped(rows).div_(self._spread(part))

    def divide_into(self, grad: torch.Tensor, ranks: int, out: torch.Tensor) -> None:
        """``out = grad / (ranks * bag sizes)``, one rounding for both
        divisions (the product is exact in float32, then cast)."""
        divisor = self._spread((self.per_feature * ranks).to(grad.dtype))
        torch.div(self._shaped(grad.reshape(out.shape)), divisor, out=self._shaped(out))


class _PendingKeyedTensor(KeyedTensor):
    """The output of a sharded lookup whose pooled rows are still on their
    way back: ``values()`` waits for them (once) and assembles the columns.
    Whatever the caller computes before asking overlaps the all-to-all.
    ``feature_blocks()`` waits likewise but hands over the received buffer
    unassembled (``FeatureBlocks``), where the layout allows, else None."""

    def __init__(self, dist_: PooledEmbeddingsDist, received, box, batch, data_parallel_pooled, mean_counts) -> None:
        super().__init__(dist_.feature_names, dist_.feature_dims, None)
        self._dist, self._received, self._box = dist_, received, box
        self._batch, self._data_parallel_pooled, self._mean_counts = batch, data_parallel_pooled, mean_counts
        self._joined: Optional[torch.Tensor] = None

    def _join(self) -> Optional[torch.Tensor]:
        # The rows were sent before the caller's dense layers ran; the node
        # made here (after them) runs early in the backward.
        if self._joined is None and self._received is not None:
            finish = finish_row_sums if isinstance(self._box, _RowSumsBox) else finish_output_dist
            self._joined = finish(self._received, self._box)
            self._received = self._box = None
        return self._joined

    def feature_blocks(self) -> Optional[FeatureBlocks]:
        if self._dist.block_layout is None or (self._received is None and self._joined is None):
            return None
        return self._dist.blocks(self._join())

    def values(self) -> torch.Tensor:
        if self._values is None:
            self._values = self._dist.assemble(self._join(), self._batch, self._data_parallel_pooled, self._mean_counts)
            self._data_parallel_pooled = None
        return self._values

    def __getitem__(self, key: str) -> torch.Tensor:
        self.values()
        return super().__getitem__(key)


class _OutputBox:
    """What the two halves of one output all-to-all share: the sizes, and
    the collective in flight (the forward's, then the backward's)."""

    def __init__(self, batch_sizes: List[int], widths: List[int], group, grad_scale: float) -> None:
        self.batch_sizes, self.widths, self.group, self.grad_scale = batch_sizes, widths, group, grad_scale
        self.work = None
        self.pooled = None  # this rank's pooled rows, as the graph knows them

    def wait_forward(self) -> None:
        """Waits for the forward collective, then drops the pooled rows
        (sent by then, or never to be). Held here they form a cycle
        (rows -> their autograd node -> its context -> this box -> rows)
        that only the garbage collector breaks, long after the step: the
        lookup's output buffer then went back to its pool late, and every
        step mapped and faulted in a fresh one (1-12 ms of system time a
        step on the main job's row-wise shards, measured)."""
        try:
            self.work.wait()
        finally:
            self.pooled = None
        self.work = None


def start_output_dist(pooled: torch.Tensor, batch_sizes: List[int], widths: List[int], group, grad_scale: float):
    """Starts sending pooled rows back to the ranks that own the samples.

    This rank's ``pooled`` ``[sum_q B_q, W_me]`` (rows of source q
    contiguous, in rank order) is split by source; rank q receives its
    ``[B_q, W_r]`` block from every rank r, flat and in rank order (the
    caller views the blocks in place). Returns ``(buffer, box)``; the
    caller reads the buffer through ``finish_output_dist(buffer, box)``,
    which waits for it, as late as it can (the dense layers compute
    meanwhile).

    The backward is split the same way: ``OutputDist``'s backward, which
    autograd runs as soon as the gradient of the joined columns is known
    (its node is younger than the dense layers'), starts the reverse
    all-to-all; ``_WaitGradient``'s, older than the dense layers', waits for
    it just before the local lookup's backward. The dense layers' backward
    (and DDP's all-reduce launch) runs while the gradients travel. The
    gradients are multiplied by ``grad_scale`` on arrival (as they are
    copied out of shared memory: no pass of its own): 1 / ranks, so that a
    step of the group trains like one process on the group's whole batch
    with the mean of the ranks' losses, as DDP averages dense gradients.
    """
    box = _OutputBox(batch_sizes, widths, group, grad_scale)
    box.pooled = _WaitGradient.apply(pooled, box)
    me = dist.get_rank(group)
    pending: List = []
    received = all_to_all(
        box.pooled.detach().reshape(-1),
        [b * widths[me] for b in batch_sizes],
        [batch_sizes[me] * w for w in widths],
        group,
        "output_dist",
        pending,
    )
    box.work = pending[0]
    return received, box


class _WaitGradient(torch.autograd.Function):
    """Identity; its backward waits for the gradient all-to-all that
    ``OutputDist``'s backward started."""

    @staticmethod
    def forward(ctx, pooled, box):
        ctx.box = box
        return pooled.view_as(pooled)

    @staticmethod
    def backward(ctx, grad):
        box = ctx.box
        box.work.wait()  # the gradients arrive scaled
        box.work = None
        return grad, None


def finish_output_dist(received: torch.Tensor, box: _OutputBox) -> torch.Tensor:
    """The buffer of ``start_output_dist``, filled, on the autograd graph."""
    return OutputDist.apply(box.pooled, received, box)


class OutputDist(torch.autograd.Function):
    """The received pooled rows (waits for the forward all-to-all); its
    backward starts the gradients' all-to-all and returns its buffer,
    not yet filled (``_WaitGradient`` waits before anyone reads it)."""

    @staticmethod
    def forward(ctx, pooled, received, box):
        ctx.box = box
        box.wait_forward()
        return received

    @staticmethod
    def backward(ctx, grad):
        box = ctx.box
        me = dist.get_rank(box.group)
        batch_sizes, widths = box.batch_sizes, box.widths
        pending: List = []
        received = all_to_all(
            grad.reshape(-1),
            [batch_sizes[me] * w for w in widths],
            [b * widths[me] for b in batch_sizes],
            box.group,
            "output_dist_backward",
            pending,
            scale=None if box.grad_scale == 1.0 else box.grad_scale,
        )
        box.work = pending[0]
        return received.view(sum(batch_sizes), widths[me]), None, None


# -- row-wise sharding of every table: a reduce-scatter ------------------------


class _RowSumsBox(_OutputBox):
    """An ``_OutputBox`` whose forward sums the ranks' blocks; ``divisor``
    (a ``_MeanDivisor``, if any feature is mean-pooled) divides the sum."""

    def __init__(self, batch_sizes: List[int], width: int, group, divisor) -> None:
        # (grad_scale is unused here: RowSums.backward divides by the ranks itself, with the mean divisor if any)
        super().__init__(batch_sizes, [width] * len(batch_sizes), group, 1.0 / len(batch_sizes))
        self.divisor: Optional[_MeanDivisor] = divisor
        self.summed: Optional[torch.Tensor] = None  # the flat buffer being summed into


def start_row_sums(pooled: torch.Tensor, batch_sizes: List[int], group, divisor=None):
    """``start_output_dist`` for a layout of whole-width row shards of every
    feature on every rank: the output is the sum of the ranks' partial
    sums, so their blocks are added as they arrive (``sum_row_shards``:
    two ranks of one host add the peer's block straight out of shared
    memory and divide the mean-pooled features by ``divisor`` piece by
    piece, while in cache), not received side by side and added after.
    The backward writes the gradient, divided by the ranks (the
    ``grad_scale`` of ``start_output_dist``), into its own place in the
    gradient buffer and sends that block to every rank (no joined copy,
    no pass of its own for the scale). Returns ``(buffer, box)`` for
    ``finish_row_sums``."""
    width = pooled.shape[1]
    box = _RowSumsBox(batch_sizes, width, group, divisor)
    box.pooled = _WaitGradient.apply(pooled, box)
    pending: List = []
    summed = sum_row_shards(
        box.pooled.detach().reshape(-1), [b * width for b in batch_sizes], group, "output_dist", pending,
        row_width=width, then=divisor.divide_rows_ if divisor is not None else None,
    )  # fmt: skip
    box.work = pending[0]
    box.summed = summed
    return summed, box


def finish_row_sums(summed: torch.Tensor, box: _RowSumsBox) -> torch.Tensor:
    """The buffer of ``start_row_sums``, filled, ``[B, width]``, on the autograd graph.

    ``summed`` is that buffer, which ``box`` holds too (``RowSums`` takes
    it from there: see its docstring); the argument keeps the signature of
    ``finish_output_dist``, which ``_PendingKeyedTensor`` calls alike."""
    return RowSums.apply(box.pooled, box)


class RowSums(torch.autograd.Function):
    """The ranks' partial sums, summed (waits for them); its backward
    starts the gradient's all-to-all, as ``OutputDist``'s. The buffer is
    not an input of the function, so that its output is a tensor of its
    own (not a view of an input: those refuse in-place changes), as the
    sum of the blocks was before."""

    @staticmethod
    def forward(ctx, pooled, box):
        ctx.box = box
        box.wait_forward()
        me = dist.get_rank(box.group)
        total, box.summed = box.summed, None
        return total.resize_(box.batch_sizes[me], box.widths[me])  # same elements: no copy, no view

    @staticmethod
    def backward(ctx, grad):
        box = ctx.box
        me = dist.get_rank(box.group)
        batch_sizes, width = box.batch_sizes, box.widths[me]
        # d(sum) / d(each rank's part) is the sum's gradient, the same for
        # every rank: scaled (grad_scale is 1 / ranks; divided, rounded
        # once) into this rank's own place, and sent from there.
        ranks = len(batch_sizes)
        received = grad.new_empty(sum(batch_sizes) * width)
        first = sum(batch_sizes[:me]) * width
        own = received[first : first + batch_sizes[me] * width].view(batch_sizes[me], width)
        if box.divisor is not None:
            box.divisor.divide_into(grad, ranks, own)
        else:
            torch.div(grad, ranks, out=own)
        pending: List = []
        all_to_all_blocks(
            [own] * len(batch_sizes), [b * width for b in batch_sizes], box.group, "output_dist_backward", pending,
            output=received,
        )  # fmt: skip
        box.work = pending[0]
        return received.view(sum(batch_sizes), width), None
