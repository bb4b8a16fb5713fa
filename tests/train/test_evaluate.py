"""``python -m dist_rec.evaluate``: a checkpoint written by a 2-process
row-wise run, evaluated on 1 process and on 3 (its rows resharded both
ways), reports the metrics the trainer's own evaluations reported, and
writes every evaluation sample's prediction in data order."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_rec.config import load_config
from dist_rec.evaluate import PREDICTIONS_HEADER, main
from dist_rec.metrics import auc
from dist_rec.testing.multi_process import run_multi_process
from dist_rec.train import Environment, train

ROOT = Path(__file__).resolve().parents[2]
EVAL_SAMPLES = 1000  # not a multiple of the evaluation batch: every rank count leaves a short tail
METRICS = ("auc", "ne", "log_loss", "accuracy", "click_rate")


def _train_rank(rank, world_size, out, checkpoint_dir):
    config = load_config(
        "launch/configs/tiny.yaml",
        [f"train.output_dir={out}", f"train.checkpoint_dir={checkpoint_dir}", "train.steps=20", "train.batch_size=32",
         "train.checkpoint_every=10", "train.eval_every=10", "train.eval_batch_size=128", "sharding.type=row_wise",
         f"data.eval_samples={EVAL_SAMPLES}"],
    )  # fmt: skip
    env = Environment(rank=rank, world_size=world_size, local_world_size=world_size, backend="gloo")
    train(config, env, quiet=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-process run: checkpoints at steps 10 and 20, evaluations at both."""
    root = tmp_path_factory.mktemp("evaluate")
    run_multi_process(_train_rank, world_size=2, out=str(root / "run"), checkpoint_dir=str(root / "ckpt"))
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    assert sorted(evals) == [10, 20]
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["eval"] == {k: v for k, v in evals[20].items() if k not in ("kind", "step")}
    return root, evals


def _evaluate_rank(rank, world_size, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    assert main(argv) == 0


def _read_predictions(path: Path):
    lines = path.read_text().splitlines()
    assert lines[0] == PREDICTIONS_HEADER
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(row) == 2 for row in rows)
    probabilities = torch.tensor([float(p) for _, p in rows], dtype=torch.float64)
    return probabilities, torch.tensor([float(y) for y, _ in rows], dtype=torch.float64)


def _check(result_file: Path, predictions: Path, expected: dict, step: int) -> dict:
    result = json.loads(result_file.read_text())
    assert result["step"] == step and result["checkpoint"].endswith(f"step-{step:09d}")
    assert result["eval"]["num_samples"] == expected["num_samples"] == EVAL_SAMPLES
    for name in METRICS:
        assert result["eval"][name] == pytest.approx(expected[name], abs=1e-6), name
    probabilities, labels = _read_predictions(predictions)
    assert probabilities.numel() == EVAL_SAMPLES
    assert auc(probabilities, labels) == pytest.approx(result["eval"]["auc"], abs=1e-9)
    assert float(labels.mean()) == pytest.approx(result["eval"]["click_rate"], abs=1e-12)
    return result


def test_one_and_three_processes_report_the_trainers_final_evaluation(trained, tmp_path, capsys):
    root, evals = trained
    argv = ["--checkpoint", str(root / "ckpt"), "--predictions", str(tmp_path / "one.tsv"),
            "--json", str(tmp_path / "one.json")]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("step 20 (") and f"{EVAL_SAMPLES:,} samples" in line
    assert line.endswith(f"predictions {tmp_path / 'one.tsv'}")
    assert f"AUC {evals[20]['auc']:.6f} | NE {evals[20]['ne']:.6f} | log loss {evals[20]['log_loss']:.6f}" in line
    one = _check(tmp_path / "one.json", tmp_path / "one.tsv", evals[20], step=20)
    assert one["processes"] == 1

    argv = ["--checkpoint", str(root / "ckpt"), "--predictions", str(tmp_path / "three.tsv"),
            "--json", str(tmp_path / "three.json")]  # fmt: skip
    run_multi_process(_evaluate_rank, world_size=3, argv=argv)
    three = _check(tmp_path / "three.json", tmp_path / "three.tsv", evals[20], step=20)
    assert three["processes"] == 3
    for name in METRICS:
        assert three["eval"][name] == pytest.approx(one["eval"][name], abs=1e-6), name
    # The same samples in the same order, whatever the number of ranks.
    p1, y1 = _read_predictions(tmp_path / "one.tsv")
    p3, y3 = _read_predictions(tmp_path / "three.tsv")
    assert torch.equal(y1, y3)
    torch.testing.assert_close(p3, p1, rtol=0, atol=1e-6)


def test_an_earlier_step_reports_that_steps_evaluation(trained, tmp_path):
    root, evals = trained
    argv = ["--checkpoint", str(root / "ckpt"), "--step", "10", "--predictions", str(tmp_path / "p.tsv"),
            "--json", str(tmp_path / "m.json")]  # fmt: skip
    assert main(argv) == 0
    _check(tmp_path / "m.json", tmp_path / "p.tsv", evals[10], step=10)


def test_overrides_choose_the_evaluation_data(trained, tmp_path):
    root, _ = trained
    assert main(["--checkpoint", str(root / "ckpt" / "step-000000020"), "--json", str(tmp_path / "m.json"),
                 "data.eval_samples=300", "train.eval_batch_size=64"]) == 0  # fmt: skip
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["eval"]["num_samples"] == 300 and result["predictions"] is None
    assert result["data"] == {"source": "synthetic", "eval_samples": 300, "seed": 0}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}/missing"], "The checkpoint directory {tmp}/missing does not exist."),
        (["--checkpoint", "{tmp}"], "No checkpoint in {tmp}: it holds no complete step-* entry"),
        (["--checkpoint", "{ckpt}", "--step", "15"], "No checkpoint of step 15 in {ckpt}; it holds step(s) 10, 20."),
        (["--checkpoint", "{ckpt}/step-000000010", "--step", "20"], "is the checkpoint of step 10, not 20"),
        (["--checkpoint", "{ckpt}", "model.embedding_dim=4", "model.dense_arch_layer_sizes=[16,4]"],
         "Cannot evaluate {ckpt}/step-000000020 with this config: model.dense_arch_layer_sizes: [16, 8] in the "
         "checkpoint"),
        (["--checkpoint", "{ckpt}", "train.eval_batch_size=0"], "Invalid train.eval_batch_size=0."),
    ],
)  # fmt: skip
def test_errors_exit_2_with_a_message(trained, tmp_path, capsys, args, message):
    root, _ = trained
    fill = dict(tmp=tmp_path, ckpt=root / "ckpt")
    assert main([a.format(**fill) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and message.format(**fill) in captured.err


def test_the_command_line_exits_2_on_an_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "dist_rec.evaluate", "--checkpoint", str(tmp_path / "none")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"error: The checkpoint directory {tmp_path / 'none'} does not exist."
