"""Evaluate a checkpoint on one process or many: ``python -m dist_rec.evaluate``.

Loads a checkpoint that ``python -m dist_rec.train`` wrote (its
``train.checkpoint_dir``: the newest entry, or ``--step N``'s) on any
number of processes, whatever world size, sharding and 2D grid saved it
(the tables are resharded on load, as a resume does), and reports exact
AUC / NE / log loss over the evaluation set: the config's
``data.eval_paths``, or the synthetic evaluation set for ``source:
synthetic``. These are the numbers the trainer's own evaluation reports for
the same model and data.

    python -m dist_rec.evaluate --checkpoint runs/ckpt --predictions runs/eval/predictions.tsv --json runs/eval.json
    torchrun --nproc-per-node 4 -m dist_rec.evaluate --checkpoint runs/ckpt --step 2000 "data.eval_paths=[day_23.tsv]"

The config is the one saved with the checkpoint unless ``--config FILE``
names another; ``section.field=value`` overrides apply to either (the
evaluation data: ``data.*``; the batch: ``train.eval_batch_size``; the
sharding: ``sharding.*``, one replica group unless ``sharding.replicas``
says otherwise). A setting that fixes the checkpoint's shapes
(``model.embedding_dim``, the table sizes, ...) cannot change.

Rank 0 prints one line (step, samples, AUC, NE, log loss, the predictions
file), writes ``--predictions FILE`` (a header, then one line per sample in
the evaluation set's order: label and predicted probability, tab-separated)
and ``--json FILE`` (the metrics). Errors print ``error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from dist_rec.checkpoint import CheckpointError, CheckpointReader, load_checkpoint, read_manifest
from dist_rec.checkpoint.series import CheckpointSeries
from dist_rec.config import ConfigError, TrainConfig, apply_overrides, load_config, parse_override
from dist_rec.distributed import destroy_process_group, init_single_process_group
from dist_rec.metrics import EvalMetrics, binary_metrics
from dist_rec.trainer.builders import Data, build_data, build_model, shard_model
from dist_rec.trainer.checkpointing import FIXED_BY_CHECKPOINT, changed_settings
from dist_rec.trainer.environment import Environment, setup_environment
from dist_rec.trainer.evaluation import predictions_in_data_order

__all__ = [
    "CheckpointEvaluation",
    "EvaluationError",
    "evaluate_checkpoint",
    "evaluation_config",
    "find_checkpoint",
    "main",
    "write_predictions",
]

PREDICTIONS_HEADER = "label\tprobability"


class EvaluationError(ValueError):
    """What the command refuses before evaluating (printed as ``error: ...``, exit 2)."""


@dataclass
class CheckpointEvaluation:
    """A checkpoint evaluated: its entry, step, the metrics, and the
    predictions (float64, in the evaluation set's order, on every rank)."""

    checkpoint: Path
    step: int
    processes: int
    metrics: EvalMetrics
    probabilities: torch.Tensor
    labels: torch.Tensor

    def as_dict(self, config: TrainConfig, predictions: Optional[str] = None) -> Dict:
        d = config.data
        if d.source == "synthetic":
            data = {"source": d.source, "eval_samples": d.eval_samples, "seed": d.seed}
        else:
            data = {"source": d.source, "eval_paths": list(d.eval_paths)}
        return {"checkpoint": str(self.checkpoint), "step": self.step, "processes": self.processes, "data": data,
                "predictions": predictions, "eval": self.metrics.as_dict()}  # fmt: skip


# -- which checkpoint, which config ----------------------------------------------------


def _step_of(entry: Path) -> int:
    return int(read_manifest(entry)["step"])


def find_checkpoint(directory, step: Optional[int] = None) -> Path:
    """The checkpoint to load from ``directory``: a ``train.checkpoint_dir``
    (its newest restorable entry, or the entry of ``step``), one of its
    entries, or a single checkpoint. Raises ``EvaluationError`` /
    ``CheckpointError`` naming what is wrong."""
    root = Path(directory)
    if step is not None and step < 0:
        raise EvaluationError(f"Invalid --step {step}. Must be >= 0.")
    if not root.exists():
        raise EvaluationError(f"The checkpoint directory {root} does not exist.")
    if not root.is_dir():
        raise EvaluationError(f"{root} is not a directory (--checkpoint takes a train.checkpoint_dir or one of its "
                              "entries).")  # fmt: skip
    if (root / "manifest.json").is_file():  # one entry of a series, or a single checkpoint
        saved = _step_of(root)
        if step is not None and step != saved:
            raise EvaluationError(f"{root} is the checkpoint of step {saved}, not {step} (to choose a step, pass the "
                                  "series' directory, train.checkpoint_dir).")  # fmt: skip
        CheckpointSeries(root.parent).chain(root)  # a delta's parents are there
        return root
    series = CheckpointSeries(root)
    entries = series.entries()
    if not entries:
        raise EvaluationError(f"No checkpoint in {root}: it holds no complete step-* entry (a train.checkpoint_dir is "
                              "filled by python -m dist_rec.train with train.checkpoint_dir set).")  # fmt: skip
    if step is None:
        return series.latest()[-1]
    steps = {}
    for entry in entries:
        try:
            steps[_step_of(entry)] = entry
        except CheckpointError:
            continue
    if step not in steps:
        held = ", ".join(map(str, sorted(steps)))
        raise EvaluationError(f"No checkpoint of step {step} in {root}; it holds step(s) {held}.")
    series.chain(steps[step])  # restorable: its chain back to a base is complete
    return steps[step]


def saved_config(entry: Path) -> Optional[Dict]:
    """The config the trainer saved with the checkpoint (its extra data), or None."""
    extra = CheckpointReader(entry).read_dense()["extra"]
    config = extra.get("config") if isinstance(extra, dict) else None
    return config if isinstance(config, dict) and config else None


def evaluation_config(entry: Path, config_file: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config to evaluate ``entry`` with: ``config_file`` or the one
    saved with it, with ``overrides`` applied; one replica group unless
    ``sharding.replicas`` is overridden. Refuses (``EvaluationError``) a
    change to a setting the checkpoint's shapes depend on."""
    saved = saved_config(entry)
    if config_file is not None:
        config = load_config(config_file, overrides)
    elif saved is None:
        raise EvaluationError(f"The checkpoint {entry} carries no config (not written by python -m dist_rec.train); "
                              "pass --config FILE.")  # fmt: skip
    else:
        config = TrainConfig.from_dict(apply_overrides(copy.deepcopy(saved), overrides))
    if not any(parse_override(o)[0] == ["sharding", "replicas"] for o in overrides):
        config.sharding.replicas = 1  # 2D replicas speed training up; any world size evaluates with one group
    if saved is not None:
        fixed = {name: values for name, values in changed_settings(saved, config.to_dict()).items()
                 if any(name == s or name.startswith(s + ".") for s in FIXED_BY_CHECKPOINT)}  # fmt: skip
        if fixed:
            listed = "; ".join(f"{name}: {a!r} in the checkpoint, {b!r} now" for name, (a, b) in fixed.items())
            raise EvaluationError(f"Cannot evaluate {entry} with this config: {listed}. The checkpoint's tables and "
                                  "layers were saved under the first value.")  # fmt: skip
    return config


# -- the evaluation --------------------------------------------------------------------


def evaluate_checkpoint(
    entry: Path, config: TrainConfig, env: Environment, data: Optional[Data] = None
) -> CheckpointEvaluation:
    """Builds the model as the trainer does (``builders``), loads ``entry``
    into it (``load_checkpoint``, resharding onto this world) and evaluates
    it over ``data.eval``: a collective over the default group (a group of
    this process alone is made, and ended, when there is none)."""
    data = data if data is not None else build_data(config)
    if data.eval is None:
        raise EvaluationError(_no_eval_data(config))
    own_group = not dist.is_initialized()
    if own_group:
        init_single_process_group()
    try:
        torch.manual_seed(config.train.seed)
        model = build_model(config, data, env.device)
        sharded = shard_model(model, config, env, data=data)
        info = load_checkpoint(entry, sharded)  # dense layers and tables; the optimizers' state is not needed
        probabilities, labels = predictions_in_data_order(sharded.unwrapped, data.eval, config, env)
    finally:
        if own_group:
            destroy_process_group()
    return CheckpointEvaluation(Path(info["directory"]), int(info["step"]), env.world_size,
                                binary_metrics(probabilities, labels), probabilities, labels)  # fmt: skip


def _no_eval_data(config: TrainConfig) -> str:
    return (f"The config names no evaluation data (data.source={config.data.source!r}, data.eval_paths=[]); pass "
            "data.eval_paths=[PATH].")  # fmt: skip


def write_predictions(path, probabilities: torch.Tensor, labels: torch.Tensor) -> Path:
    """A header, then ``label<TAB>probability`` per sample (the probability
    to float32's precision: 9 significant digits), written whole or not at
    all (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(PREDICTIONS_HEADER + "\n")
        p, y = probabilities.tolist(), labels.tolist()
        chunk = 1 << 16
        for start in range(0, len(p), chunk):
            rows = zip(y[start : start + chunk], p[start : start + chunk])
            f.write("".join(f"{label:g}\t{prob:.9g}\n" for label, prob in rows))
    os.replace(tmp, path)
    return path


def _write_json(path, record: Dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def summary_line(result: CheckpointEvaluation, predictions: Optional[str]) -> str:
    m = result.metrics
    return (
        f"step {result.step} ({result.checkpoint}, {result.processes} process(es)) | {m.num_samples:,} samples | "
        f"AUC {m.auc:.6f} | NE {m.ne:.6f} | log loss {m.log_loss:.6f} | predictions {predictions or '-'}"
    )


# -- the command -----------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a train.checkpoint_dir written by python -m dist_rec.train (or one of its entries)")
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: the config saved with the checkpoint)")
    parser.add_argument("--step", type=int, metavar="N", help="the checkpoint of step N (default: the newest)")
    parser.add_argument("--predictions", metavar="FILE", help="write label<TAB>probability per evaluation sample here")
    parser.add_argument("--json", metavar="FILE", help="write the metrics here as JSON")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. data.eval_paths=[day_23.tsv]")
    args = parser.parse_args(argv)
    own_group = not dist.is_initialized()
    try:
        entry = find_checkpoint(args.checkpoint, args.step)
        config = evaluation_config(entry, args.config, args.overrides)
        missing = [path for path in config.data.eval_paths if not Path(path).exists()]
        if config.data.source != "synthetic" and missing:
            raise EvaluationError(f"Invalid data.eval_paths={config.data.eval_paths!r}: {missing[0]} does not exist.")
        data = build_data(config)
        if data.eval is None:
            raise EvaluationError(_no_eval_data(config))
        env = setup_environment(config)
    except (ConfigError, CheckpointError, EvaluationError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        result = evaluate_checkpoint(entry, config, env, data)
        if env.is_main:
            predictions = None
            if args.predictions:
                predictions = str(write_predictions(args.predictions, result.probabilities, result.labels))
            if args.json:
                _write_json(args.json, result.as_dict(config, predictions))
            print(summary_line(result, predictions), flush=True)
    except (CheckpointError, OSError) as error:  # a load refused on every rank alike; a file rank 0 could not write
        if env.is_main:
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if own_group and dist.is_initialized():
            destroy_process_group()
    return 0


if __name__ == "__main__":
    from dist_rec.distributed.world import run_command

    run_command(main)
