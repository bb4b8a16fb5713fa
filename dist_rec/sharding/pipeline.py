"""A train loop that sends the next batch's ids while this batch trains.

The sharded collections' input dist (routing, the counts all-to-all, the
all-to-all of bag lengths and ids) needs nothing from the current step, so
``TrainPipelineSparseDist`` starts it one batch ahead, as TorchRec's
pipeline of the same name does, in two stages around the current batch's
forward::

    start_input_dist(batch i + 1)     route, counts all-to-all (background)
    forward(batch i)                  its ids arrived during step i - 1
    continue_input_dist()             counts in; ids all-to-all (background)
    backward, optimizer step, sync    the ids of batch i + 1 travel meanwhile

Each collective is issued in the same order on every rank, so the ranks
stay matched. The arithmetic is the plain loop's: losses and weights are
identical step for step (``tests/sharding/test_pipeline.py``). A model
without sharded collections (one process, or a dense-only model) trains
through the same loop, its stages empty: the trainer has one step for
every sharding type.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from dist_rec.sharding.sharded_ebc import ShardedEmbeddingBagCollection


def _sparse_features_of(batch) -> Any:
    return batch.sparse_features


class TrainPipelineSparseDist:
    """Trains ``model`` one batch per ``progress`` call, the input dist of
    the next batch overlapping the current step.

    Args:
        model (nn.Module): the model (e.g. a ``DistributedModelParallel``),
            holding the ``ShardedEmbeddingBagCollection``s whose input dist
            runs ahead (none: the stages are empty).
        optimizer (Optional[torch.optim.Optimizer]): the dense optimizer (the
            tables update in the backward), zeroed before and stepped after
            each backward; None when ``step`` does both (a dense engine).
        forward (Callable[[nn.Module, batch], Tensor]): the loss of one
            batch, e.g. ``lambda m, b: bce(m(b.dense_features,
            b.sparse_features).squeeze(1), b.labels)``.
        sparse_features (Callable): the batch's ``KeyedJaggedTensor`` (a
            model with one sharded collection), or ``{module path: KJT}``
            (several). The same object must reach the collection's forward:
            the collection matches a started batch by identity. (Default:
            ``batch.sparse_features``)
        backward (Callable[[Tensor], None]): runs the backward of the loss
            (e.g. a dense engine's). (Default: ``loss.backward()``)
        sync (bool): call ``model.sync()`` after the optimizer step when the
            model has one (``DistributedModelParallel``: 2D replicas).
            (Default: True)
        step (Optional[Callable[[], None]]): the dense step after the
            backward (e.g. a dense engine's, which zeroes the gradients
            too). (Default: ``optimizer.step()``)

    Every rank must see the same number of batches (e.g. ``drop_last``):
    the input dist of the next batch is a collective. ``progress`` raises
    ``StopIteration`` when the batches are exhausted.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        forward: Callable[[nn.Module, Any], torch.Tensor],
        sparse_features: Callable[[Any], Any] = _sparse_features_of,
        backward: Optional[Callable[[torch.Tensor], None]] = None,
        sync: bool = True,
        step: Optional[Callable[[], None]] = None,
    ) -> None:
        if optimizer is None and step is None:
            raise ValueError("TrainPipelineSparseDist: give the dense optimizer, or a step that replaces it.")
        self.model = model
        self.optimizer = optimizer
        self._forward = forward
        self._sparse_features = sparse_features
        self._backward = backward if backward is not None else (lambda loss: loss.backward())
        self._step = step if step is not None else optimizer.step
        self._sync = getattr(model, "sync", None) if sync else None
        self._collections: Dict[str, ShardedEmbeddingBagCollection] = {}
        for path, module in model.named_modules():
            if isinstance(module, ShardedEmbeddingBagCollection) and path not in self._collections:
                self._collections[path] = module
        self._current: Any = None
        self._exhausted = False

    def _inputs(self, batch) -> List[Tuple[ShardedEmbeddingBagCollection, Any]]:
        if not self._collections:
            return []
        features = self._sparse_features(batch)
        if isinstance(features, dict):
            unknown = sorted(set(features) - set(self._collections))
            if unknown:
                raise ValueError(f"No sharded collection at {unknown}; the model has them at {sorted(self._collections)}.")
            return [(self._collections[path], kjt) for path, kjt in features.items()]
        if len(self._collections) != 1:
            raise ValueError(
                f"The model has {len(self._collections)} sharded collections ({sorted(self._collections)}): "
                "sparse_features must return {module path: KeyedJaggedTensor}."
            )
        return [(next(iter(self._collections.values())), features)]

    def _start(self, batch) -> None:
        for collection, features in self._inputs(batch):
            collection.start_input_dist(features)

    def _continue(self) -> None:
        for collection in self._collections.values():
            collection.continue_input_dist()

    def reset(self) -> None:
        """Forgets the batch started ahead (and the collections' in-flight
        input dists): the next ``progress`` starts afresh from the batches
        it is given. For recovery after a failed step, whose collectives
        died with their groups."""
        self._current = None
        self._exhausted = False
        for collection in self._collections.values():
            collection.drop_in_flight()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def progress(self, batches: Iterator) -> torch.Tensor:
        """One training step on the next batch; returns its loss (detached)."""
        if self._current is None:
            if self._exhausted:
                raise StopIteration
            self._current = next(batches)  # StopIteration: nothing to train on
            self._start(self._current)
        upcoming = next(batches, None)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if upcoming is not None:
            self._start(upcoming)
        loss = self._forward(self.model, self._current)
        self._continue()
        self._backward(loss)
        self._step()
        if self._sync is not None:
            self._sync()
        self._current = upcoming
        self._exhausted = upcoming is None
        return loss.detach()

