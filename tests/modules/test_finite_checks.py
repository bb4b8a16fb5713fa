"""Non-finite values never reach a row: the fused update refuses a NaN or
inf gradient (a cheap sum first, the element-wise test when the sum is not
finite), and per-id weights must be finite."""

import pytest
import torch

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.modules.embedding_modules import check_finite_gradient
from dist_rec.optim import RowWiseAdagrad


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_gradient_is_refused_naming_the_tables(bad):
    grad = torch.randn(8, 4)
    grad[3, 2] = bad
    with pytest.raises(FloatingPointError, match=r"tables \['t0', 't1'\]"):
        check_finite_gradient(grad, ["t0", "t1"])


def test_finite_values_whose_sum_overflows_pass():
    grad = torch.full((4, 4), 3e38)  # the sum is inf; every element is finite
    check_finite_gradient(grad, ["t0"])
    check_finite_gradient(torch.empty(0, 4), ["t0"])


def test_non_finite_per_id_weights_are_refused_and_rows_stay():
    ebc = EmbeddingBagCollection(
        [EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0"])],
        optimizer=RowWiseAdagrad(lr=0.1), is_weighted=True,
    )  # fmt: skip
    before = ebc.state_dict()["embedding_bags.t0.weight"].clone()
    kjt = KeyedJaggedTensor(["f0"], torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1]),
                            weights=torch.tensor([1.0, float("nan"), 0.5]))  # fmt: skip
    with pytest.raises(ValueError, match=r"Invalid per-id weight nan at values\[1\]"):
        ebc(kjt)
    assert torch.equal(ebc.state_dict()["embedding_bags.t0.weight"], before)
