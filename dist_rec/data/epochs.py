"""Epochs: passes over finite training data, one after another.

Global batch ``s`` of the run is batch ``s mod E`` of epoch ``s div E``,
where ``E`` is the number of global batches of one epoch, so a resume at
any step starts in the right epoch at the right batch. A dataset that can
shuffle (``BinaryDataset`` with a seed) takes the epoch and draws that
epoch's order; any other is read again in the same order. ``E`` comes
from the dataset's length where it has one; a stream of unknown length
learns it from the first pass (a resume past the first epoch of such a
stream reads one epoch to count it).
"""

from __future__ import annotations

import inspect
from typing import Iterator, Optional

from dist_rec.data.batch import Batch


class EpochStream(Iterator[Batch]):
    """This rank's training batches over ``epochs`` passes of ``dataset``,
    from global batch ``start_step`` on. ``epoch`` is the epoch of the
    batch last returned; ``exhausted`` turns true when every epoch is done."""

    def __init__(self, dataset, epochs: int, batch_size: int, rank: int, world_size: int, start_step: int = 0) -> None:
        if epochs < 1:
            raise ValueError(f"Invalid epochs={epochs!r}. Must be >= 1.")
        self.dataset, self.epochs = dataset, epochs
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.steps_per_epoch: Optional[int] = None
        try:
            self.steps_per_epoch = len(dataset) // (batch_size * world_size)
        except TypeError:  # a stream: no length, or an endless one
            pass
        self.exhausted = False
        self.epoch = 0
        self._iterator = self._batches(start_step)

    def __next__(self) -> Batch:
        try:
            return next(self._iterator)
        except StopIteration:
            self.exhausted = True
            raise

    def close(self) -> None:
        self._iterator.close()

    def _open(self, epoch: int, start_step: int) -> Iterator[Batch]:
        kwargs = {}
        parameters = inspect.signature(self.dataset.batches).parameters
        if "epoch" in parameters:
            kwargs["epoch"] = epoch
        if start_step:
            kwargs["start_step"] = start_step
        return self.dataset.batches(self.batch_size, self.rank, self.world_size, drop_last=True, **kwargs)

    def _batches(self, start_step: int) -> Iterator[Batch]:
        epoch, local = 0, start_step
        if self.steps_per_epoch:
            epoch, local = divmod(start_step, self.steps_per_epoch)
        while epoch < self.epochs:
            self.epoch = epoch
            count = 0
            for batch in self._open(epoch, local):
                count += 1
                yield batch
            if count == 0 and local == 0:
                return  # not one global batch in an epoch
            if count == 0 and self.steps_per_epoch is None:  # a resume past the end of the first epoch: count it
                self.steps_per_epoch = sum(1 for _ in self._open(0, 0))
                if self.steps_per_epoch == 0:
                    return
                skipped, local = divmod(local, self.steps_per_epoch)
                epoch += skipped
                continue
            if self.steps_per_epoch is None and local == 0:
                self.steps_per_epoch = count
            epoch, local = epoch + 1, 0
