"""Samples in the order a file holds them, and the split of a stream of
them over ranks and into a held-out part.

``SampleRows`` is a chunk of parsed samples, sample-major (each sample's
bags together, as in a file): readers parse into it, then cut it into the
batches of ``dist_rec.data.batch``'s rank split with ``RankBlocks``.

The held-out split (``held_out``) is a pure function of a sample's index in
its stream and a seed: a sample is held out when a hash of (seed, index)
falls under the fraction. Every rank and every world size therefore agrees
on it without a pass over the data, and ``HeldOutSplit`` applies it to any
dataset.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from dist_rec.data.batch import Batch, check_rank, concatenated_ranges, kjt_from_sample_major


@dataclass
class SampleRows:
    """Parsed samples: labels ``[n]``, dense ``[n, D]``, ``lengths [n, F]``
    (ids per sample and feature), ``offsets [n + 1]`` (where each sample's
    ids start in ``values``), ``values`` (sample-major) and optional
    per-id ``weights`` beside them."""

    labels: np.ndarray
    dense: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    values: np.ndarray
    weights: Optional[np.ndarray] = None

    @staticmethod
    def build(labels, dense, lengths, values, weights=None) -> "SampleRows":
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths.sum(axis=1), out=offsets[1:])
        return SampleRows(np.asarray(labels, np.float32), np.asarray(dense, np.float32), lengths, offsets,
                          np.asarray(values, np.int64), None if weights is None else np.asarray(weights, np.float32))  # fmt: skip

    @staticmethod
    def empty(num_dense: int, num_sparse: int, weighted: bool = False) -> "SampleRows":
        return SampleRows.build(np.zeros(0), np.zeros((0, num_dense)), np.zeros((0, num_sparse)), np.zeros(0),
                                np.zeros(0) if weighted else None)  # fmt: skip

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "SampleRows":
        index = np.asarray(index, dtype=np.int64)
        gather = concatenated_ranges(self.offsets[index], self.offsets[index + 1] - self.offsets[index])
        return SampleRows.build(self.labels[index], self.dense[index], self.lengths[index], self.values[gather],
                                None if self.weights is None else self.weights[gather])  # fmt: skip

    def slice(self, start: int, stop: int) -> "SampleRows":
        first, last = int(self.offsets[start]), int(self.offsets[stop])
        return SampleRows(self.labels[start:stop], self.dense[start:stop], self.lengths[start:stop],
                          self.offsets[start : stop + 1] - first, self.values[first:last],
                          None if self.weights is None else self.weights[first:last])  # fmt: skip

    @staticmethod
    def concat(parts: Sequence["SampleRows"]) -> "SampleRows":
        if len(parts) == 1:
            return parts[0]
        weighted = parts[0].weights is not None
        return SampleRows.build(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.weights for p in parts]) if weighted else None,
        )

    def to_batch(self, keys: Sequence[str]) -> Batch:
        return Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(self.dense)),
            sparse_features=kjt_from_sample_major(keys, self.values, self.lengths, self.weights),
            labels=torch.from_numpy(np.ascontiguousarray(self.labels)),
        )

    @staticmethod
    def from_batch(batch: Batch) -> "SampleRows":
        """A batch back in sample-major order."""
        kjt = batch.sparse_features
        size, num_features = batch.batch_size, len(kjt.keys())
        lengths = kjt.lengths().detach().cpu().numpy().astype(np.int64)
        starts = kjt.offsets().detach().cpu().numpy().astype(np.int64)[:-1]
        order = np.arange(num_features * size).reshape(num_features, size).T.reshape(-1)
        gather = concatenated_ranges(starts[order], lengths[order])
        weights = kjt.weights_or_none()
        return SampleRows.build(
            batch.labels.detach().cpu().numpy(),
            batch.dense_features.detach().cpu().numpy(),
            lengths[order].reshape(size, num_features),
            kjt.values().detach().cpu().numpy()[gather],
            None if weights is None else weights.detach().cpu().numpy()[gather],
        )


class RankBlocks:
    """Cuts a stream of ``SampleRows`` into this rank's batches under the
    split of ``dist_rec.data.batch``: global batch ``k`` is the next
    ``world_size * batch_size`` samples, and this rank takes block ``rank``
    of it. With ``drop_last`` a global batch that is not complete is
    dropped (every rank yields the same number); without, the tail is dealt
    out in blocks, rank by rank."""

    def __init__(self, batch_size: int, rank: int, world_size: int, drop_last: bool = True, start_step: int = 0) -> None:
        check_rank(rank, world_size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"Invalid batch_size={batch_size!r}. Must be an int > 0.")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"Invalid start_step={start_step!r}. Must be an int >= 0.")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.drop_last, self.start_step = drop_last, start_step

    def __call__(self, chunks: Iterable[SampleRows]) -> Iterator[SampleRows]:
        b, w = self.batch_size, self.world_size
        global_batch = b * w
        to_skip = self.start_step * global_batch  # samples of the global batches before start_step
        pending: List[SampleRows] = []
        count = 0
        for chunk in chunks:
            if to_skip:
                drop = min(to_skip, len(chunk))
                to_skip -= drop
                chunk = chunk.slice(drop, len(chunk))
            if len(chunk) == 0:
                continue
            pending.append(chunk)
            count += len(chunk)
            if count < global_batch:
                continue
            rows = SampleRows.concat(pending)
            done = 0
            while count - done >= global_batch:
                start = done + self.rank * b
                yield rows.slice(start, start + b)
                done += global_batch
            pending, count = [rows.slice(done, len(rows))], count - done
        if not self.drop_last and count:
            rows = SampleRows.concat(pending)
            start = self.rank * b
            while start < count:
                yield rows.slice(start, min(start + b, count))
                start += global_batch


def held_out(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each stream index is held out: a splitmix64 hash of
    (seed, index), as a uniform number in [0, 1), under ``fraction``."""
    x = np.asarray(indices, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 1) % 2**64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


class HeldOutSplit:
    """One part of any dataset under the held-out split: ``part="eval"``
    keeps the held-out samples, ``"train"`` the others (``Dataset``
    protocol).

    Every rank reads the whole underlying stream (one rank's view of it) and
    keeps its blocks of the part; a binary dataset splits by index instead
    (``BinaryDataset(..., select=...)``), without that cost.
    """

    equal_batches_per_rank = True

    def __init__(self, dataset, fraction: float, seed: int, part: str, chunk: int = 4096) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"Invalid eval_fraction={fraction!r}. Must be in (0, 1).")
        if part not in ("train", "eval"):
            raise ValueError(f"Invalid part={part!r}. Must be 'train' or 'eval'.")
        # A copy of the reader per part: each keeps its own skip counts (and
        # seek notes) while the two parts' passes interleave.
        self.dataset = copy.copy(dataset)
        self.fraction, self.seed, self.part, self._chunk = fraction, seed, part, chunk

    def __getattr__(self, name):  # names, sizes, skip counts: the underlying dataset's
        if name == "dataset" or name.startswith("__"):  # not its length: the part's is unknown
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = True, start_step: int = 0,
                epoch: int = 0) -> Iterator[Batch]:  # fmt: skip
        blocks = RankBlocks(batch_size, rank, world_size, drop_last, start_step)
        keys = self.dataset.sparse_feature_names
        return (rows.to_batch(keys) for rows in blocks(self._rows(epoch)))

    def _rows(self, epoch: int) -> Iterator[SampleRows]:
        index = 0  # every epoch the same split of the same stream (streams split this way are not shuffled)
        for batch in self.dataset.batches(self._chunk, 0, 1, drop_last=False):
            rows = SampleRows.from_batch(batch)
            mask = held_out(index + np.arange(len(rows)), self.fraction, self.seed)
            index += len(rows)
            yield rows.take(np.flatnonzero(mask if self.part == "eval" else ~mask))
