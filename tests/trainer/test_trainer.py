"""The ``Trainer``'s loop: its components act when they say so, capabilities
that are off are null objects, hooks see every step, checkpoint and
failure, and the per-step agreement on "every rank has a batch" runs only
for a data source that does not promise equal batches per rank."""

import pytest
import torch

from dist_rec.config import load_config
from dist_rec.testing.multi_process import run_multi_process
from dist_rec.trainer import Environment, Trainer, TrainerHook
from dist_rec.trainer import trainer as trainer_module
from dist_rec.trainer.components import NullCheckpointer, NullEvaluator, NullReplicaSync


def _config(out: str, steps: int = 6, **overrides):
    values = [
        "train.batch_size=16",
        f"train.steps={steps}",
        "train.log_every=2",
        "train.eval_every=0",
        f"train.output_dir={out}",
    ] + [f"{k}={v}" for k, v in overrides.items()]
    return load_config("launch/configs/tiny.yaml", values)


class Recorder(TrainerHook):
    def __init__(self, fail_at=None):
        self.steps, self.checkpoints, self.failures, self.fail_at = [], [], [], fail_at

    def after_step(self, trainer, step):
        self.steps.append(step)
        if step == self.fail_at:
            raise RuntimeError(f"injected at step {step}")

    def on_checkpoint(self, trainer, step, directory):
        self.checkpoints.append((step, directory.name))

    def on_failure(self, trainer, step, error):
        self.failures.append((step, str(error)))


def test_hooks_see_every_step_and_checkpoint(tmp_path):
    hook = Recorder()
    config = _config(str(tmp_path / "out"), steps=6, **{"train.checkpoint_dir": str(tmp_path / "ckpt"), "train.checkpoint_every": 4})
    result = Trainer(config, Environment(), quiet=True, hooks=[hook]).train()
    assert hook.steps == [1, 2, 3, 4, 5, 6]
    assert hook.checkpoints == [(4, "step-000000004"), (6, "step-000000006")]  # every 4 steps, and at the end
    assert hook.failures == [] and result.steps == 6 and len(result.losses) == 3


def test_a_failing_step_reaches_the_failure_hooks_then_raises(tmp_path):
    hook = Recorder(fail_at=3)
    trainer = Trainer(_config(str(tmp_path / "out")), Environment(), quiet=True, hooks=[hook])
    with pytest.raises(RuntimeError, match="injected at step 3"):
        trainer.train()
    assert hook.steps == [1, 2, 3] and hook.failures == [(3, "injected at step 3")]


def test_capabilities_that_are_off_are_null_objects(tmp_path):
    trainer = Trainer(_config(str(tmp_path / "out")), Environment(), quiet=True)
    # One process, no checkpoint directory: no sharded model, no replicas.
    assert trainer.sharded is None
    assert isinstance(trainer.checkpointer, NullCheckpointer)
    assert isinstance(trainer.replica_sync, NullReplicaSync)
    assert not isinstance(trainer.evaluator, NullEvaluator)  # the synthetic set has an evaluation split
    assert trainer.train().steps == 6


class _Uneven:
    """A stream of unknown length: rank r has 5 - 2r batches, and it makes
    no promise of equal batches per rank."""

    def __init__(self, dataset, rank):
        self._dataset, self._rank = dataset, rank
        self.sparse_feature_names = dataset.sparse_feature_names
        self.num_dense_features = dataset.num_dense_features

    def batches(self, batch_size, rank=0, world_size=1, drop_last=True):
        stream = self._dataset.batches(batch_size, rank, world_size, drop_last)
        for _ in range(5 - 2 * rank):
            yield next(stream)


def _agreement_rank(rank, world_size, out, uneven):
    env = Environment(rank=rank, world_size=world_size, local_world_size=world_size, backend="gloo")
    calls = []
    original = trainer_module._all_have_batch
    trainer_module._all_have_batch = lambda has: calls.append(has) or original(has)
    trainer = Trainer(_config(out, steps=8, **{"sharding.type": "row_wise"}), env, quiet=True)
    if uneven:
        trainer.data.train = _Uneven(trainer.data.train, rank)
    result = trainer.train()
    if uneven:  # every rank stops at the first step some rank cannot fill
        assert result.steps == 3 and len(calls) == 4 and calls[-1] is (rank == 0)
    else:  # the synthetic stream promises equal batches: no per-step collective
        assert result.steps == 8 and calls == []


@pytest.mark.parametrize("uneven", [False, True], ids=["equal-batches", "unknown-length"])
def test_batch_agreement_only_where_the_data_needs_it(tmp_path, uneven):
    run_multi_process(_agreement_rank, world_size=2, timeout=180, out=str(tmp_path / "out"), uneven=uneven)
