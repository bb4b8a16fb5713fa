"""The batch every reader yields, and how readers split data over ranks.

A batch is what a DLRM step consumes: dense features ``[B, num_dense]``
(float32), sparse features as a ``KeyedJaggedTensor`` (feature-major, as
TorchRec) and labels ``[B]`` (float32, 0 or 1).

Every reader splits its samples over ranks the same way: in blocks of
``batch_size`` consecutive samples, block ``k`` going to rank
``k % world_size``. So step ``s`` of rank ``r`` trains on samples
``[(s * world_size + r) * B, ... + B)``: ``world_size`` processes with batch
``B`` see, step by step, exactly the samples one process with batch
``world_size * B`` sees, in the same order. That is what makes data-parallel
training with N processes equal to training with one (tests rely on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from dist_rec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """One step's worth of samples.

    Args:
        dense_features (Tensor): ``[B, num_dense]`` float32.
        sparse_features (KeyedJaggedTensor): ``B`` bags per feature.
        labels (Tensor): ``[B]`` float32.
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            self.dense_features.to(device, non_blocking=non_blocking),
            self.sparse_features.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )


class Dataset(Protocol):
    """What the trainer needs from a data source.

    ``equal_batches_per_rank``: a source that guarantees every rank the
    same number of batches (with ``drop_last``) says so with a True class
    attribute; for any other (a stream of unknown length) the trainer
    agrees over the ranks, before each step, that every rank has a batch.
    """

    equal_batches_per_rank: bool

    @property
    def sparse_feature_names(self) -> List[str]: ...

    @property
    def num_dense_features(self) -> int: ...

    def batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = True, start_step: int = 0
    ) -> Iterator[Batch]:
        """This rank's batches, split as the module docstring says. With
        ``drop_last`` a rank yields only full batches; without, the last one
        may be short (evaluation). ``start_step`` skips the first global
        batches by seeking, not by reading them (a resume)."""
        ...


def rank_block_ranges(
    num_samples: int, batch_size: int, rank: int, world_size: int, drop_last: bool = True, start_step: int = 0
) -> Iterator[Tuple[int, int]]:
    """Sample ranges ``[start, stop)`` of this rank's batches over
    ``num_samples`` samples, from global batch ``start_step`` on. With
    ``drop_last`` every rank yields the same number of full batches (a
    global batch that is not complete is dropped), so collectives stay in
    step."""
    check_rank(rank, world_size)
    if batch_size <= 0:
        raise ValueError(f"Invalid batch_size={batch_size}. Must be > 0.")
    if start_step < 0:
        raise ValueError(f"Invalid start_step={start_step}. Must be >= 0.")
    global_batch = batch_size * world_size
    if drop_last:
        steps = num_samples // global_batch
        for step in range(start_step, steps):
            start = step * global_batch + rank * batch_size
            yield start, start + batch_size
        return
    start = start_step * global_batch + rank * batch_size
    while start < num_samples:
        yield start, min(start + batch_size, num_samples)
        start += global_batch


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"Invalid world_size={world_size}. Must be >= 1.")
    if not 0 <= rank < world_size:
        raise ValueError(f"Invalid rank={rank}. Must be in [0, world_size={world_size}).")


def kjt_from_sample_major(
    keys: Sequence[str], values: np.ndarray, lengths: np.ndarray, weights: Optional[np.ndarray] = None
) -> KeyedJaggedTensor:
    """Builds a feature-major KeyedJaggedTensor from sample-major storage.

    ``lengths`` is ``[B, F]`` and ``values`` lists sample 0's bags (feature 0
    first), then sample 1's, and so on: the natural order of a file. The
    KeyedJaggedTensor wants feature 0's bags of all samples first.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    num_samples, num_features = lengths.shape
    if num_features != len(keys):
        raise ValueError(f"lengths has {num_features} features per sample; keys are {list(keys)}.")
    flat = lengths.reshape(-1)
    if flat.sum() != len(values):
        raise ValueError(f"lengths sum to {int(flat.sum())} but there are {len(values)} values.")
    # Bag (sample b, feature f) moves to position f * B + b.
    new_lengths = np.ascontiguousarray(lengths.T).reshape(-1)
    if flat.size and flat.max() <= 1:  # one-hot bags (some empty): value i is the bag where the i-th 1 is
        position = np.cumsum(flat).reshape(num_samples, num_features).T  # (1 + a present bag's value)
        gather = position[lengths.T > 0] - 1
    else:
        starts = np.zeros(flat.size, dtype=np.int64)
        np.cumsum(flat[:-1], out=starts[1:])
        order = np.arange(flat.size).reshape(num_samples, num_features).T.reshape(-1)
        gather = concatenated_ranges(starts[order], new_lengths)
    values_out = torch.from_numpy(np.ascontiguousarray(np.asarray(values)[gather]))
    weights_out = None
    if weights is not None:
        weights_out = torch.from_numpy(np.ascontiguousarray(np.asarray(weights, dtype=np.float32)[gather]))
    return KeyedJaggedTensor(
        keys, values_out, lengths=torch.from_numpy(new_lengths), weights=weights_out, stride=num_samples
    )


def kjt_from_id_matrix(keys: Sequence[str], ids: np.ndarray) -> KeyedJaggedTensor:
    """One id per (sample, feature) from a ``[B, F]`` matrix; negative
    entries are missing values and become empty bags."""
    ids = np.asarray(ids)
    present = ids.T >= 0  # [F, B], feature-major
    values = torch.from_numpy(np.ascontiguousarray(ids.T[present]).astype(np.int64, copy=False))
    lengths = torch.from_numpy(present.reshape(-1).astype(np.int64))
    return KeyedJaggedTensor(keys, values, lengths=lengths, stride=ids.shape[0])


def concatenated_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    nonzero = lengths > 0
    starts, lengths = starts[nonzero], lengths[nonzero]
    step = np.ones(total, dtype=np.int64)
    ends = np.cumsum(lengths)
    step[0] = starts[0]
    step[ends[:-1]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return np.cumsum(step)
