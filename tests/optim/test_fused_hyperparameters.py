"""The fused sparse optimizers refuse hyper-parameters that are not finite
numbers in their range, when built and when a schedule sets them later: an
``lr=inf`` or a NaN would write non-finite values into every row it steps."""

import re

import pytest

from dist_rec.optim import SGD, MomentumScaledRowWiseAdagrad, RowWiseAdagrad

# Each optimizer with the numeric hyper-parameters it has.
CASES = [
    (cls, name, rule)
    for cls, names in [
        (SGD, ["lr", "weight_decay"]),
        (RowWiseAdagrad, ["lr", "weight_decay", "eps"]),
        (MomentumScaledRowWiseAdagrad, ["lr", "weight_decay", "eps", "momentum_scale"]),
    ]
    for name, rule in [
        ("lr", ">= 0"), ("weight_decay", ">= 0"), ("eps", "> 0"),
        ("momentum_scale", ">= 1 (and at most the replica count)"),
    ]  # fmt: skip
    if name in names
]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("cls, name, rule", CASES, ids=lambda x: getattr(x, "__name__", x))
def test_non_finite_hyperparameters_are_refused(cls, name, rule, bad):
    message = f"Invalid {name}={bad}. Must be finite and {rule}."
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(**{name: bad})
    # Set later (a schedule): refused as well, the old value kept.
    optimizer = cls()
    before = getattr(optimizer, name)
    with pytest.raises(ValueError, match=re.escape(message)):
        setattr(optimizer, name, bad)
    assert getattr(optimizer, name) == before


def test_range_and_type_are_still_checked():
    with pytest.raises(ValueError, match=re.escape("Invalid lr=-0.1. Must be >= 0.")):
        SGD(lr=-0.1)
    message = "Invalid momentum_scale=0.5. Must be >= 1 (and at most the replica count)."
    with pytest.raises(ValueError, match=re.escape(message)):
        MomentumScaledRowWiseAdagrad(momentum_scale=0.5)
    with pytest.raises(TypeError, match=re.escape("Invalid eps='small'. Must be a number.")):
        RowWiseAdagrad(eps="small")
    optimizer = RowWiseAdagrad(lr=0.1)
    optimizer.lr = 0.05  # a schedule's step
    assert optimizer.lr == 0.05
