"""Exact evaluation metrics over the whole evaluation set of all ranks."""

from __future__ import annotations

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
    was_training = model.training
    model.eval()
    probabilities, labels = [], []
    batch_size = config.train.eval_batch_size
    batches = dataset.batches(batch_size, env.rank, env.world_size, drop_last=False)
    template = None
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
            template = batch
            batch = batch.to(env.device)
            logits = model(batch.dense_features, batch.sparse_features).reshape(-1)
            probabilities.append(torch.sigmoid(logits).cpu())
            labels.append(batch.labels.cpu())
    model.train(was_training)
    local_p = torch.cat(probabilities) if probabilities else torch.zeros(0)
    local_y = torch.cat(labels) if labels else torch.zeros(0)
    all_p, all_y = gather_predictions(local_p, local_y)
    return binary_metrics(all_p, all_y)
