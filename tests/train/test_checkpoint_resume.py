"""The trainer checkpoints and resumes: a run stopped at step 6 and resumed
(on the same or another number of processes, with the same global batch)
continues exactly like the run that never stopped."""

import shutil

import torch

from dist_rec.config import load_config
from dist_rec.testing.multi_process import run_multi_process
from dist_rec.train import Environment, train


def _config(batch_size: int, steps: int, out: str, checkpoint_dir: str = "", sharding: str = "row_wise", *extra: str):
    return load_config(
        "launch/configs/tiny.yaml",
        [
            f"train.batch_size={batch_size}",
            f"train.steps={steps}",
            "train.log_every=1",
            "train.eval_every=0",
            f"train.output_dir={out}",
            f"train.checkpoint_dir={checkpoint_dir}",
            f"sharding.type={sharding}",
            "data.mean_bag_length=2.0",
            *extra,
        ],
    )


def _train_rank(rank, world_size, steps, out, checkpoint_dir, sharding, result_file):
    env = Environment(rank=rank, world_size=world_size, local_world_size=world_size, backend="gloo")
    result = train(_config(16 // world_size, steps, out, checkpoint_dir, sharding), env, quiet=True)
    if rank == 0:
        torch.save(result.losses, result_file)


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    full = tmp_path / "full.pt"
    run_multi_process(_train_rank, world_size=2, steps=12, out=str(tmp_path / "a"), checkpoint_dir="",
                      sharding="row_wise", result_file=str(full))
    checkpoint = tmp_path / "ckpt"
    first = tmp_path / "first.pt"
    run_multi_process(_train_rank, world_size=2, steps=6, out=str(tmp_path / "b"), checkpoint_dir=str(checkpoint),
                      sharding="row_wise", result_file=str(first))
    assert _entries(checkpoint) == ["step-000000006"]
    copy = tmp_path / "ckpt_copy"
    shutil.copytree(checkpoint, copy)
    # Resume on 2 processes with another sharding, and on 1 process (batch 16).
    second = tmp_path / "second.pt"
    run_multi_process(_train_rank, world_size=2, steps=12, out=str(tmp_path / "c"), checkpoint_dir=str(checkpoint),
                      sharding="table_wise", result_file=str(second))
    single = train(_config(16, 12, str(tmp_path / "d"), str(copy), "data_parallel"), Environment(), quiet=True)

    expected = torch.tensor(torch.load(full))
    torch.testing.assert_close(torch.tensor(torch.load(first)), expected[:6], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(torch.load(second)), expected[6:], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(single.losses), expected[6:], rtol=0, atol=1e-5)
    assert _entries(checkpoint) == _entries(copy) == ["step-000000006", "step-000000012"]


def _entries(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def test_resume_after_an_interrupted_publish_takes_the_newest_complete_sibling(tmp_path, capsys):
    """A single checkpoint (the layout before series) whose save died
    between its two renames leaves no ``<dir>`` but a complete
    ``<dir>.old-*`` (the previous checkpoint) and a complete ``<dir>.tmp-*``
    (the new one): the trainer resumes from the newer, never from step 0
    over it, and once its series holds a save the leftovers go."""
    checkpoint = tmp_path / "ckpt"
    train(_config(16, 8, str(tmp_path / "a"), str(checkpoint)), Environment(), quiet=True)
    (checkpoint / "step-000000008").rename(tmp_path / "ckpt.tmp-8-bbbbbbbbbb")  # the crash, in the old layout
    shutil.copytree(tmp_path / "ckpt.tmp-8-bbbbbbbbbb", tmp_path / "ckpt.old-4-aaaaaaaaaa")
    manifest = tmp_path / "ckpt.old-4-aaaaaaaaaa" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"step": 8', '"step": 4'))
    shutil.rmtree(checkpoint)
    capsys.readouterr()
    result = train(_config(16, 12, str(tmp_path / "c"), str(checkpoint)), Environment(), quiet=False)
    out = capsys.readouterr().out
    assert "continuing at step 8" in out, out
    assert result.steps == 12 and len(result.losses) == 4  # steps 9..12 only (log_every=1)
    assert _entries(checkpoint) == ["step-000000012"]
    assert not list(tmp_path.glob("ckpt.tmp-*")) and not list(tmp_path.glob("ckpt.old-*"))


def test_resume_skips_an_entry_whose_publish_was_interrupted(tmp_path, capsys):
    """A series entry still under its temporary name is never read: the
    newest complete entry is resumed from, and the leftover is cleared."""
    checkpoint = tmp_path / "ckpt"
    train(_config(16, 8, str(tmp_path / "a"), str(checkpoint), "row_wise", "train.checkpoint_every=4"), Environment(), quiet=True)
    (checkpoint / "step-000000008").rename(checkpoint / "step-000000008.tmp-cccccccccc")
    capsys.readouterr()
    result = train(_config(16, 12, str(tmp_path / "c"), str(checkpoint)), Environment(), quiet=False)
    assert "continuing at step 4" in capsys.readouterr().out
    assert result.steps == 12 and len(result.losses) == 8
    assert _entries(checkpoint) == ["step-000000004", "step-000000012"]


def test_a_checkpoint_dir_that_is_a_file_is_refused_at_the_start(tmp_path):
    import pytest

    from dist_rec.config import ConfigError

    (tmp_path / "ckpt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not a directory"):
        train(_config(16, 4, str(tmp_path / "a"), str(tmp_path / "ckpt")), Environment(), quiet=True)
