"""Exact evaluation metrics over the whole evaluation set of all ranks, and
the predictions behind them in the set's order (``python -m dist_rec.evaluate``)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn

from dist_rec.config import TrainConfig
from dist_rec.data.batch import Batch, Dataset
from dist_rec.metrics import EvalMetrics, binary_metrics, gather_predictions
from dist_rec.sparse.jagged_tensor import KeyedJaggedTensor
from dist_rec.trainer.environment import Environment


def any_has_batch(has_batch: bool) -> bool:
    flag = torch.tensor([int(has_batch)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def empty_batch(like: Batch) -> Batch:
    """A batch of no samples with ``like``'s features and dtypes."""
    kjt = like.sparse_features
    empty = KeyedJaggedTensor(
        list(kjt.keys()), kjt.values()[:0], lengths=kjt.lengths()[:0],
        weights=kjt.weights_or_none()[:0] if kjt.weights_or_none() is not None else None,
    )
    return Batch(like.dense_features[:0], empty, like.labels[:0])


def evaluate(model: nn.Module, dataset: Dataset, config: TrainConfig, env: Environment) -> EvalMetrics:
    """Exact metrics over the whole evaluation set of all ranks."""
    probabilities, labels, _ = local_predictions(model, dataset, config, env)
    all_p, all_y = gather_predictions(probabilities, labels)
    return binary_metrics(all_p, all_y)


def predictions_in_data_order(
    model: nn.Module, dataset: Dataset, config: TrainConfig, env: Environment
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's predicted probabilities and labels (float64), gathered
    on every rank in the order of the evaluation set (whatever the number of
    ranks: rank ``r``'s ``i``-th batch is the set's block ``i * world + r``)."""
    probabilities, labels, positions = local_predictions(model, dataset, config, env)
    all_p, all_y = gather_predictions(probabilities, labels)
    all_positions, _ = gather_predictions(positions.double(), labels)  # the same counts, in the same rank order
    order = torch.argsort(all_positions)
    if not torch.equal(all_positions[order], torch.arange(all_positions.numel(), dtype=torch.float64)):
        raise RuntimeError(f"{type(dataset).__name__} does not split its samples over ranks in blocks of the batch "
                           "size (dist_rec.data.batch): its predictions cannot be put in data order.")  # fmt: skip
    return all_p.double()[order], all_y.double()[order]


def local_predictions(
    model: nn.Module, dataset: Dataset, config: TrainConfig, env: Environment
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share of the evaluation set through ``model`` (a
    collective when distributed): probabilities, labels and each sample's
    position in the set (int64)."""
    was_training = model.training
    model.eval()
    probabilities, labels, positions = [], [], []
    batch_size = config.train.eval_batch_size
    batches = dataset.batches(batch_size, env.rank, env.world_size, drop_last=False)
    template = None
    taken = 0  # this rank's batches with samples
    with torch.no_grad():
        while True:
            batch = next(batches, None)
            # A sharded forward is a collective: ranks whose share has run out
            # (or never began: fewer batches than ranks) feed empty batches
            # until every rank's has.
            if env.distributed and not any_has_batch(batch is not None):
                break
            if batch is None:
                if not env.distributed:
                    break
                if template is None:  # shaped like the set's first batch
                    template = next(dataset.batches(batch_size, 0, 1, drop_last=False))
                batch = empty_batch(template)
            else:
                start = (taken * env.world_size + env.rank) * batch_size
                positions.append(torch.arange(start, start + batch.batch_size, dtype=torch.int64))
                taken += 1
            template = batch
            batch = batch.to(env.device)
            logits = model(batch.dense_features, batch.sparse_features).reshape(-1)
            probabilities.append(torch.sigmoid(logits).cpu())
            labels.append(batch.labels.cpu())
    model.train(was_training)
    local_p = torch.cat(probabilities) if probabilities else torch.zeros(0)
    local_y = torch.cat(labels) if labels else torch.zeros(0)
    local_positions = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
    return local_p, local_y, local_positions
