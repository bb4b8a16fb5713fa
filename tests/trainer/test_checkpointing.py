"""The trainer's checkpoints: a series in ``train.checkpoint_dir``, checked
and locked at the start, pruned to ``keep_last``, never saved over with
NaN or inf, survived by a kill during the background write; a resume keeps
the metrics history and applies or refuses changed settings by name."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_rec.checkpoint import CheckpointReader
from dist_rec.checkpoint.checkpoint import NonFiniteError
from dist_rec.checkpoint.series import CheckpointSeries
from dist_rec.config import ConfigError, load_config
from dist_rec.trainer import Environment, Trainer, TrainerHook
from dist_rec.trainer.report import read_records

REPO = Path(__file__).resolve().parents[2]


def _config(out, checkpoint_dir, steps, *extra):
    return load_config(
        str(REPO / "launch/configs/tiny.yaml"),
        [f"train.steps={steps}", "train.batch_size=32", "train.log_every=1", "train.eval_every=0",
         f"train.output_dir={out}", f"train.checkpoint_dir={checkpoint_dir}", *extra],
    )  # fmt: skip


def _entries(root: Path):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-") and ".tmp-" not in p.name)


def _hashes(entry: Path):
    return {p.relative_to(entry).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(entry.rglob("*")) if p.is_file()}


class _PlantNaN(TrainerHook):
    """After step 3: the last good checkpoint's bytes are noted, then a NaN
    goes into the row-wise state of one row (the forward does not read it,
    so the loss stays finite: only the save can catch it)."""

    def __init__(self, root: Path) -> None:
        self.root, self.before, self.table = root, None, None

    def after_step(self, trainer, step: int) -> None:
        if step != 3:
            return
        trainer.checkpointer.finish()  # the save of step 2 published
        self.before = _hashes(self.root / "step-000000002")
        sharded = trainer.sharded.sharded["sparse_arch"]
        local = (sharded.local_shards() or sharded.data_parallel_tables())[0]
        weight, state = local.read()
        state = {k: v.clone() for k, v in state.items()}
        next(iter(state.values()))[-1] = float("nan")
        local.write(weight, state)
        self.table = local.table


@pytest.mark.parametrize("async_save", [True, False])
def test_a_nan_in_a_table_refuses_the_save_and_stops_the_run(tmp_path, async_save):
    root = tmp_path / "ckpt"
    hook = _PlantNaN(root)
    config = _config(tmp_path / "out", root, 8, "train.checkpoint_every=2", f"checkpoint.async_save={async_save}")
    with pytest.raises(NonFiniteError) as refusal:
        Trainer(config, Environment(), quiet=True, hooks=[hook]).train()
    assert f"table {hook.table!r}" in str(refusal.value) and "NaN or inf" in str(refusal.value)
    assert _entries(root) == ["step-000000002"]  # nothing after the last good one
    assert _hashes(root / "step-000000002") == hook.before  # byte-identical
    CheckpointReader(root / "step-000000002").check_present()  # and it verifies
    assert not list(root.glob("*.tmp-*"))


def test_a_diverged_loss_stops_the_run_naming_the_last_good_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    config = _config(tmp_path / "out", root, 30, "train.checkpoint_every=2", "optimizer.dense_lr=1e30",
                     "optimizer.sparse_lr=1e30")  # fmt: skip
    with pytest.raises(FloatingPointError, match="diverged"):  # the loss, or the gradient it gave, is not finite
        Trainer(config, Environment(), quiet=True).train()
    for entry in _entries(root):  # whatever was saved before is whole
        CheckpointReader(root / entry).check_present()


def test_keep_last_keeps_exactly_n(tmp_path):
    root = tmp_path / "ckpt"
    Trainer(_config(tmp_path / "out", root, 7, "train.checkpoint_every=1", "checkpoint.keep_last=3"),
            Environment(), quiet=True).train()  # fmt: skip
    assert _entries(root) == ["step-000000005", "step-000000006", "step-000000007"]
    Trainer(_config(tmp_path / "out2", tmp_path / "inc", 7, "train.checkpoint_every=1", "checkpoint.keep_last=2",
                    "checkpoint.policy=incremental", "checkpoint.base_every=3"), Environment(), quiet=True).train()  # fmt: skip
    # bases at saves 1, 4, 7: the newest two saves are step 6 (delta of 4, 5) and step 7 (a base)
    assert _entries(tmp_path / "inc") == ["step-000000004", "step-000000005", "step-000000006", "step-000000007"]


def test_a_second_job_on_the_same_directory_is_refused(tmp_path):
    root = tmp_path / "ckpt"
    holder = CheckpointSeries(root)
    holder.lock()  # another job holds it
    try:
        with pytest.raises(ConfigError, match="in use by another job"):
            Trainer(_config(tmp_path / "out", root, 4), Environment(), quiet=True)
    finally:
        holder.unlock()
    Trainer(_config(tmp_path / "out", root, 4), Environment(), quiet=True).train()  # free again


def test_the_directory_is_checked_at_the_start(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ConfigError, match="holds no dist_rec checkpoints"):
        Trainer(_config(tmp_path / "out", foreign, 4, "train.checkpoint_every=0"), Environment(), quiet=True)
    assert (foreign / "cat.jpg").read_bytes() == b"meow"


def test_a_resume_keeps_the_metrics_history_and_applies_or_refuses_changes(tmp_path, capsys):
    root, out = tmp_path / "ckpt", tmp_path / "out"
    Trainer(_config(out, root, 4, "train.checkpoint_every=2", "optimizer.dense_lr=0.01"), Environment(), quiet=True).train()
    with pytest.raises(Exception, match=r"model.embedding_dim: 8 in the checkpoint, 16 now"):
        Trainer(_config(out, root, 8, "model.embedding_dim=16", "model.dense_arch_layer_sizes=[16,16]"),
                Environment(), quiet=True).train()  # fmt: skip
    capsys.readouterr()
    trainer = Trainer(_config(out, root, 8, "train.checkpoint_every=2", "optimizer.dense_lr=0.05"), Environment())
    trainer.train()
    printed = capsys.readouterr().out
    assert "optimizer.dense_lr changed since the checkpoint: 0.01 -> 0.05 (applied)" in printed, printed
    assert all(group["lr"] == 0.05 for group in trainer.dense_optimizer.param_groups)
    steps = [r["step"] for r in read_records(out / "metrics.jsonl") if r.get("kind") == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


KILLED_RUN = """
import sys
from dist_rec.config import load_config
from dist_rec.trainer import Environment, Trainer
config = load_config(sys.argv[1], sys.argv[2:])
Trainer(config, Environment(), quiet=True).train()
"""


def test_a_kill_during_the_background_write_keeps_the_last_good_checkpoint(tmp_path):
    """SIGKILL (injected once the save of step 4 has written its first file,
    in the writer thread) leaves step 2 whole and no half entry that looks
    complete; the next run resumes from step 2."""
    root = tmp_path / "ckpt"
    args = [str(REPO / "launch/configs/tiny.yaml"), "train.steps=8", "train.batch_size=32", "train.eval_every=0",
            f"train.output_dir={tmp_path / 'out'}", f"train.checkpoint_dir={root}", "train.checkpoint_every=2",
            'fault.inject=["rank=0 step=4 at=checkpoint"]']  # fmt: skip
    run = subprocess.run([sys.executable, "-c", KILLED_RUN, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert _entries(root) == ["step-000000002"], list(root.iterdir())
    assert list(root.glob("step-000000004.tmp-*"))  # what the kill interrupted, never read
    CheckpointReader(root / "step-000000002").check_present()
    resumed = Trainer(_config(tmp_path / "out", root, 8, "train.checkpoint_every=2"), Environment(), quiet=True)
    result = resumed.train()
    assert result.steps == 8 and len(result.losses) == 6  # steps 3..8
    assert _entries(root) == ["step-000000006", "step-000000008"] and not list(root.glob("*.tmp-*"))


def test_auto_interval_is_chosen_from_the_mtbf_and_logged(tmp_path, capsys):
    config = _config(tmp_path / "out", tmp_path / "ckpt", 12, "train.checkpoint_every=3", "checkpoint.auto_interval=true",
                     "fault.mtbf_s=3600")  # fmt: skip
    trainer = Trainer(config, Environment())
    trainer.train()
    printed = capsys.readouterr().out
    assert "by the young-daly rule: MTBF 3600 s" in printed, printed
    assert trainer.checkpointer.interval is not None and trainer.checkpointer.interval.rule.startswith("young-daly")
