"""The trainer on Criteo data: text and its binary conversion train alike."""

import random

import pytest
import torch

from dist_rec.config import load_config
from dist_rec.data.convert_criteo import main as convert
from dist_rec.train import Environment, train


def _write_criteo(path, lines, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(lines):
        label = str(int(rng.random() < 0.3))
        ints = ["" if rng.random() < 0.1 else str(rng.randint(-2, 500)) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{rng.randrange(16**8):08x}" for _ in range(26)]
        rows.append("\t".join([label] + ints + cats))
    path.write_text("\n".join(rows) + "\n")


def _config(source, train_path, eval_path, out):
    return load_config(
        "launch/configs/tiny.yaml",
        [
            f"data.source={source}",
            f"data.train_paths=[{train_path}]",
            f"data.eval_paths=[{eval_path}]",
            "data.num_embeddings_per_feature=[97]",
            "model.embedding_dim=8",
            "train.steps=0",
            "train.batch_size=32",
            "train.log_every=1",
            f"train.output_dir={out}",
        ],
    )


def test_text_and_binary_train_identically(tmp_path):
    _write_criteo(tmp_path / "train.tsv", 330, seed=0)
    _write_criteo(tmp_path / "eval.tsv", 70, seed=1)
    for split in ("train", "eval"):
        args = ["--num-embeddings", "97", "--out", str(tmp_path / f"{split}_bin"), str(tmp_path / f"{split}.tsv")]
        assert convert(args) == 0
    text = train(_config("criteo_text", tmp_path / "train.tsv", tmp_path / "eval.tsv", tmp_path / "t"), Environment(), quiet=True)
    binary = train(_config("criteo_binary", tmp_path / "train_bin", tmp_path / "eval_bin", tmp_path / "b"), Environment(), quiet=True)
    assert text.steps == binary.steps == 330 // 32  # one pass, the short tail dropped
    torch.testing.assert_close(torch.tensor(text.losses), torch.tensor(binary.losses), rtol=0, atol=1e-6)
    assert text.final_eval.num_samples == binary.final_eval.num_samples == 70
    assert text.final_eval.auc == pytest.approx(binary.final_eval.auc, abs=1e-9)


def test_binary_hashed_with_other_sizes_is_refused(tmp_path):
    _write_criteo(tmp_path / "train.tsv", 40, seed=0)
    assert convert(["--num-embeddings", "50", "--out", str(tmp_path / "bin"), str(tmp_path / "train.tsv")]) == 0
    config = _config("criteo_binary", tmp_path / "bin", tmp_path / "bin", tmp_path / "b")
    with pytest.raises(ValueError, match="Must match the sizes the binary dataset"):
        train(config, Environment(), quiet=True)
