"""Exact AUC / NE / log loss against plain references, and over ranks."""

import math

import pytest
import torch

from dist_rec.metrics import auc, binary_metrics, gather_predictions, log_loss, normalized_entropy
from dist_rec.testing.multi_process import run_multi_process


def auc_by_pairs(scores, labels):
    """Every (positive, negative) pair: 1 if ordered right, 1/2 if tied."""
    pos = [s for s, y in zip(scores.tolist(), labels.tolist()) if y == 1]
    neg = [s for s, y in zip(scores.tolist(), labels.tolist()) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def ne_by_formula(p, y):
    p, y = p.double().tolist(), y.double().tolist()
    loss = -sum(yi * math.log(pi) + (1 - yi) * math.log(1 - pi) for pi, yi in zip(p, y)) / len(y)
    rate = sum(y) / len(y)
    return loss / -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)), loss


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n,levels", [(7, 3), (50, 1000), (300, 10)])  # few levels: many ties
def test_auc_ne_logloss_match_plain_references(seed, n, levels):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.3).double()
    labels[0], labels[1] = 0, 1  # both classes present
    scores = (torch.randint(1, levels + 1, (n,), generator=g).double() / (levels + 1)).clamp(0.01, 0.99)
    assert auc(scores, labels) == pytest.approx(auc_by_pairs(scores, labels), abs=1e-12)
    ne, loss = ne_by_formula(scores, labels)
    assert normalized_entropy(scores, labels) == pytest.approx(ne, rel=1e-12)
    assert log_loss(scores, labels) == pytest.approx(loss, rel=1e-12)
    metrics = binary_metrics(scores, labels)
    assert metrics.accuracy == pytest.approx(float(((scores > 0.5).double() == labels).double().mean()))
    assert metrics.num_samples == n


def test_metric_edge_cases():
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([0.9, 0.1]), torch.tensor([0.0, 1.0])) == 0.0
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])) == 0.5
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))
    assert math.isnan(normalized_entropy(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.0])))
    # Predicting the base rate everywhere has NE 1.
    labels = torch.tensor([1.0, 0, 0, 0])
    assert normalized_entropy(torch.full((4,), 0.25), labels) == pytest.approx(1.0)


def _gather_rank(rank, world_size, out):
    g = torch.Generator().manual_seed(rank)
    count = 5 + 3 * rank  # ranks hold different counts
    p, y = torch.rand(count, generator=g), (torch.rand(count, generator=g) < 0.5).float()
    all_p, all_y = gather_predictions(p, y)
    torch.save((p, y, all_p, all_y), f"{out}/rank{rank}.pt")


def test_gather_predictions_joins_all_ranks_in_order(tmp_path):
    run_multi_process(_gather_rank, world_size=3, out=str(tmp_path))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    expected_p = torch.cat([p for p, _, _, _ in parts]).double()
    expected_y = torch.cat([y for _, y, _, _ in parts]).double()
    for _, _, all_p, all_y in parts:
        torch.testing.assert_close(all_p, expected_p)
        torch.testing.assert_close(all_y, expected_y)
