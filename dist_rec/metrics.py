"""Evaluation metrics of a click model: exact AUC, normalised entropy, log
loss, accuracy, computed over the whole evaluation set of all ranks.

AUC is exact (sort-based, ties counted half), not a histogram estimate;
evaluation sets of a few million samples sort in well under a second.
Normalised entropy (NE, He et al. 2014) is the log loss divided by the
entropy of the base click rate: 1.0 is no better than predicting the
average, lower is better.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist

_EPS = 1e-7


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a random positive scores above a
    random negative (ties count one half). NaN without both classes."""
    scores = scores.detach().reshape(-1).double()
    labels = labels.detach().reshape(-1).double()
    positives = float(labels.sum())
    negatives = labels.numel() - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    # Mann-Whitney U from average ranks (ties get the mean of their ranks).
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average_rank = ends - (counts.double() - 1) / 2  # 1-based
    ranks = average_rank[inverse]
    positive_rank_sum = float((ranks * labels[order]).sum())
    return (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def log_loss(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    p = probabilities.detach().reshape(-1).double().clamp(_EPS, 1 - _EPS)
    y = labels.detach().reshape(-1).double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def normalized_entropy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Log loss over the entropy of the base rate (NaN with one class)."""
    rate = float(labels.double().mean())
    if rate <= 0 or rate >= 1:
        return float("nan")
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return log_loss(probabilities, labels) / base


@dataclass
class EvalMetrics:
    auc: float
    ne: float
    log_loss: float
    accuracy: float
    click_rate: float
    num_samples: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def binary_metrics(probabilities: torch.Tensor, labels: torch.Tensor) -> EvalMetrics:
    probabilities = probabilities.detach().reshape(-1).double()
    labels = labels.detach().reshape(-1).double()
    return EvalMetrics(
        auc=auc(probabilities, labels),
        ne=normalized_entropy(probabilities, labels),
        log_loss=log_loss(probabilities, labels),
        accuracy=float(((probabilities > 0.5).double() == labels).double().mean()) if labels.numel() else float("nan"),
        click_rate=float(labels.mean()) if labels.numel() else float("nan"),
        num_samples=int(labels.numel()),
    )


def gather_predictions(
    probabilities: torch.Tensor, labels: torch.Tensor, group: Optional[dist.ProcessGroup] = None
) -> "tuple[torch.Tensor, torch.Tensor]":
    """All ranks' predictions and labels, in rank order, on every rank
    (ranks may hold different counts)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return probabilities, labels
    world = dist.get_world_size(group)
    local = torch.stack([probabilities.detach().reshape(-1).double().cpu(), labels.detach().reshape(-1).double().cpu()])
    count = torch.tensor([local.shape[1]], dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    longest = max(int(c) for c in counts)
    padded = torch.zeros(2, longest, dtype=torch.float64)
    padded[:, : local.shape[1]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    joined = torch.cat([g[:, : int(c)] for g, c in zip(gathered, counts)], dim=1)
    return joined[0], joined[1]
