"""Distributed evaluation covers every sample exactly once and never hangs,
even when ranks get unequal shares of the evaluation set or none at all
(a sharded forward is a collective: a rank that leaves early would strand
the others)."""

import json

import pytest
import torch

from dist_rec.config import load_config
from dist_rec.testing.multi_process import run_multi_process
from dist_rec.trainer import Environment, build_data, build_model, empty_batch, evaluate, shard_model


def _config(eval_samples: int, eval_batch_size: int):
    return load_config(
        "launch/configs/tiny.yaml",
        [f"data.eval_samples={eval_samples}", f"train.eval_batch_size={eval_batch_size}"],
    )


def _model(config):
    data = build_data(config)
    torch.manual_seed(config.train.seed)
    return build_model(config, data, torch.device("cpu")), data


def _evaluate_rank(rank, world_size, eval_samples, eval_batch_size, sharding, out):
    env = Environment(rank=rank, world_size=world_size, local_world_size=world_size, backend="gloo")
    config = _config(eval_samples, eval_batch_size)
    config.sharding.type = sharding
    model, data = _model(config)
    sharded = shard_model(model, config, env)
    metrics = evaluate(sharded, data.eval, config, env)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(metrics.as_dict(), f)


@pytest.mark.parametrize(
    "eval_samples,eval_batch_size",
    [(5, 8), (9, 4), (1, 1), (3, 1)],
    ids=["one-batch-for-two-ranks", "uneven-shares", "one-sample", "three-batches"],
)
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "data_parallel"])
def test_two_ranks_evaluate_like_one_process(tmp_path, eval_samples, eval_batch_size, sharding):
    run_multi_process(
        _evaluate_rank, world_size=2, timeout=90, eval_samples=eval_samples, eval_batch_size=eval_batch_size,
        sharding=sharding, out=str(tmp_path),
    )
    config = _config(eval_samples, eval_batch_size)
    model, data = _model(config)
    one = evaluate(model, data.eval, config, Environment()).as_dict()
    assert one["num_samples"] == eval_samples
    for rank in range(2):
        two = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert two["num_samples"] == eval_samples
        for name, value in one.items():
            if value == value:  # AUC of a one-class set is NaN on both sides
                assert two[name] == pytest.approx(value, rel=0, abs=1e-6), name


def test_dlrm_forward_on_anempty_batch():
    config = _config(4, 4)
    model, data = _model(config)
    empty = empty_batch(next(data.eval.batches(4)))
    logits = model(empty.dense_features, empty.sparse_features)
    assert logits.shape == (0, 1)
