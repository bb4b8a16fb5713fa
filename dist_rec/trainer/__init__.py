"""The trainer: a loop that asks its components when to act.

* ``Trainer`` / ``train`` (``trainer.py``): build from a ``TrainConfig``, run the loop.
* components (``components.py``): replica sync, progress log, checkpointer,
  evaluator, each a null object when off; ``TrainerHook`` for the rest.
* ``builders.py``: data, model, optimizers and sharding from the config.
* ``environment.py``: rank, world, device; joins the process group.
* ``evaluation.py``: exact metrics over every rank's evaluation samples.
* ``report.py``: metrics.jsonl, the training plot, the summary.
"""

from dist_rec.trainer.builders import Data, build_data, build_model, dense_optimizer, shard_model, sparse_optimizer
from dist_rec.trainer.components import TrainerHook
from dist_rec.trainer.environment import Environment, setup_environment
from dist_rec.trainer.evaluation import empty_batch, evaluate
from dist_rec.trainer.trainer import Trainer, TrainResult, train

__all__ = [
    "Data",
    "Environment",
    "TrainResult",
    "Trainer",
    "TrainerHook",
    "build_data",
    "build_model",
    "dense_optimizer",
    "empty_batch",
    "evaluate",
    "setup_environment",
    "shard_model",
    "sparse_optimizer",
    "train",
]
