"""The replica-averaging rules (MA, EASGD, BMUF) against their plain
formulas, on real gloo ranks, in float64: every rank runs the rule on its
own parameters; the reference replays all replicas from the gathered
parameters."""

import pytest
import torch
import torch.distributed as dist

from dist_rec.sync.rules import BlockMomentum, ElasticAveraging, ModelAveraging, make_rule
from dist_rec.testing.multi_process import run_multi_process

WORLD = 3
SIZE = 37
ROUNDS = 4


def _sum(x):
    wire = x.clone()
    dist.all_reduce(wire)
    return wire


def _gather(x):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return parts


def _reference_targets(name, xs, state, alpha, mu, eta, nesterov):
    """Every replica's target from all replicas' ``xs`` (the formulas as written in the papers)."""
    n = len(xs)
    mean = sum(xs) / n
    if name == "ma":
        return [mean.clone() for _ in xs]
    if name == "easgd":
        if "center" not in state:
            state["center"] = mean.clone()
        c = state["center"]
        distances = [x - c for x in xs]
        state["center"] = c + alpha * sum(distances)
        return [x - alpha * d for x, d in zip(xs, distances)]
    previous = state.setdefault("previous", state["start"])
    g = previous - mean
    state["smoothed"] = eta * g if "smoothed" not in state else mu * state["smoothed"] + eta * g
    result = previous - state["smoothed"]
    if nesterov:
        result = result - mu * state["smoothed"]
    state["previous"] = result
    return [result.clone() for _ in xs]


def _rank_rules(rank, world_size, name, alpha, mu, eta, nesterov):
    torch.manual_seed(100 + rank)
    x = torch.randn(SIZE, dtype=torch.float64)
    start = torch.randn(SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(7))  # the same on every rank
    rule = make_rule(name, world_size, alpha=alpha, block_momentum=mu, block_lr=eta, nesterov=nesterov, start=start)
    state = {"start": start.clone()}
    for round_ in range(ROUNDS):
        xs = _gather(x)
        expected = _reference_targets(name, xs, state, alpha, mu, eta, nesterov)[rank]
        x = rule.target(x, _sum)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-12)
        # The trainer's steps between rounds: each replica drifts its own way.
        x = x + 0.1 * torch.randn(SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(rank * 10 + round_))


@pytest.mark.parametrize(
    "name, alpha, mu, eta, nesterov",
    [("ma", 0.0, 0.0, 1.0, False), ("easgd", 0.3, 0.0, 1.0, False), ("bmuf", 0.0, 0.875, 1.0, False),
     ("bmuf", 0.0, 0.5, 0.7, True)],
)  # fmt: skip
def test_rules_equal_their_formulas_over_rounds(name, alpha, mu, eta, nesterov):
    run_multi_process(_rank_rules, world_size=WORLD, name=name, alpha=alpha or 0.5, mu=mu, eta=eta, nesterov=nesterov)


def test_bmuf_without_momentum_is_model_averaging():
    torch.manual_seed(0)
    xs = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    total = lambda x: sum(xs)  # noqa: E731  (every replica's sum, seen from one)
    bmuf = BlockMomentum(3, block_momentum=0.0, block_lr=1.0, start=torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(bmuf.target(xs[0], total), ModelAveraging(3).target(xs[0], total))


def test_invalid_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="sync.alpha=0"):
        ElasticAveraging(2, 0.0)
    with pytest.raises(ValueError, match="sync.block_momentum=1.0"):
        BlockMomentum(2, block_momentum=1.0)
    with pytest.raises(ValueError, match="sync.dense='sgd'"):
        make_rule("sgd", 2)
