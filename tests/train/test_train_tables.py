"""The trainer on datasets in each shape under a schema: 1 and 2 processes
train alike, table sizes come from the data, bad data is counted or stops
the run with its counts, and a bad line met by one rank stops every rank."""

import json

import pytest
import torch
import yaml

from dist_rec.config import TrainConfig
from dist_rec.data.convert import convert
from dist_rec.data.schema import Schema
from dist_rec.testing import tables
from dist_rec.testing.multi_process import run_multi_process
from dist_rec.train import Environment, train

SHAPES = {
    "criteo": (tables.criteo_lines, None, "day.tsv"),
    "avazu": (tables.avazu_lines, tables.AVAZU_SCHEMA, "avazu.csv"),
    "movielens": (tables.movielens_lines, tables.MOVIELENS_SCHEMA, "ratings.csv"),
    "sequence": (tables.sequence_lines, tables.SEQUENCE_SCHEMA, "behaviour.tsv"),
}


def _config(shape, path, out, batch_size, **data):
    tiny = yaml.safe_load(open("launch/configs/tiny.yaml"))
    _, schema, _ = SHAPES[shape]
    if schema is None:
        tiny["data"] = {"source": "criteo_text", "train_paths": [str(path)], "num_embeddings_per_feature": [97]}
    else:
        tiny["data"] = {"source": "text", "train_paths": [str(path)], "schema": schema}
    tiny["data"].update(data)
    tiny["train"].update(batch_size=batch_size, steps=12, eval_every=0, log_every=1, output_dir=str(out))
    return TrainConfig.from_dict(tiny)


def _train_rank(rank, world_size, shape, path, out, data):
    env = Environment(rank=rank, world_size=world_size, local_world_size=world_size, backend="gloo")
    result = train(_config(shape, path, f"{out}/two", 16, **data), env, quiet=True)
    if rank == 0:
        torch.save({"losses": result.losses, "auc": result.final_eval.auc}, f"{out}/two.pt")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_one_and_two_processes_train_alike(tmp_path, shape):
    make, _, name = SHAPES[shape]
    path = tables.write_lines(tmp_path / name, make(600, seed=2))
    data = {"eval_fraction": 0.2}
    run_multi_process(_train_rank, world_size=2, shape=shape, path=str(path), out=str(tmp_path), data=data)
    one = train(_config(shape, path, tmp_path / "one", 32, **data), Environment(), quiet=True)
    two = torch.load(tmp_path / "two.pt")
    assert len(one.losses) == len(two["losses"]) == 12
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one.losses), rtol=0, atol=1e-5)
    assert two["auc"] == pytest.approx(one.final_eval.auc, abs=1e-6)
    assert 60 < one.final_eval.num_samples < 180  # the held-out fifth


def test_binary_data_needs_no_table_sizes_and_shuffles_per_epoch(tmp_path):
    path = tables.write_lines(tmp_path / "avazu.csv", tables.avazu_lines(500, seed=2))
    convert([path], Schema.from_dict(tables.AVAZU_SCHEMA), tmp_path / "bin")
    tiny = yaml.safe_load(open("launch/configs/tiny.yaml"))
    tiny["data"] = {"source": "binary", "train_paths": [str(tmp_path / "bin")], "shuffle": True, "eval_fraction": 0.1}
    tiny["train"].update(batch_size=50, steps=0, epochs=3, eval_every=0, output_dir=str(tmp_path / "run"))
    result = train(TrainConfig.from_dict(tiny), Environment(), quiet=True)
    held = result.final_eval.num_samples
    assert result.steps == 3 * ((500 - held) // 50)
    ebc = result.model.sparse_arch
    sizes = {name: config.num_embeddings for name, config in ebc.embedding_bag_configs_by_name().items()} \
        if hasattr(ebc, "embedding_bag_configs_by_name") else {c.name: c.num_embeddings for c in ebc.embedding_bag_configs()}
    assert sizes["t_C14_C17"] == 300 and sizes["t_site_id"] == 500  # from meta.json; one table for C14 and C17
    assert len(sizes) == 7


def test_running_out_of_data_before_train_steps_is_said(tmp_path, capsys):
    path = tables.write_lines(tmp_path / "avazu.csv", tables.avazu_lines(200))
    config = _config("avazu", path, tmp_path / "run", 32)
    config.train.steps = 50
    config.train.epochs = 2
    result = train(config, Environment())
    assert result.steps == 12  # 2 x 6 full batches of 32
    assert "data ran out at step 12 of train.steps=50: train.epochs=2 pass(es) over the training data (6 steps per " \
           "epoch); raise train.epochs to train longer" in capsys.readouterr().out


def test_a_few_bad_lines_train_and_are_reported(tmp_path, capsys):
    lines = tables.avazu_lines(2000, seed=5)
    for i in range(100, 2000, 190):  # 10 of 2000 lines: 0.5%
        lines[i] = "garbage"
    path = tables.write_lines(tmp_path / "avazu.csv", lines)
    config = _config("avazu", path, tmp_path / "run", 64, on_error="skip", prefetch_worker="process")  # counts come back
    config.train.steps = 0
    result = train(config, Environment())
    assert result.steps == (2000 - 10) // 64
    out = capsys.readouterr().out
    assert "skipped lines: 10 of 2000 lines skipped in" in out and "(field_count 10); first: " in out
    assert "skipped lines  10 of 2,000 (field_count 10)" in out  # the summary table
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_lines"]["skipped"] == 10
    assert summary["skipped_lines"]["by_reason"] == {"field_count": 10}


def test_a_file_of_only_bad_lines_fails_with_the_counts(tmp_path):
    path = tables.write_lines(tmp_path / "avazu.csv", tables.avazu_lines(1)[:1] + ["1,2,3"] * 40)
    config = _config("avazu", path, tmp_path / "run", 8, on_error="skip", max_skip_fraction=1.0)
    with pytest.raises(ValueError, match=r"No usable sample: 40 of 40 lines skipped in .*avazu.csv \(field_count 40\)"):
        train(config, Environment(), quiet=True)
    assert not (tmp_path / "run" / "summary.json").exists()  # no summary, no AUC


def test_fewer_samples_than_one_global_batch_is_an_error(tmp_path):
    path = tables.write_lines(tmp_path / "avazu.csv", tables.avazu_lines(20))
    with pytest.raises(ValueError, match="No training step: the training data .* holds fewer than one global batch of 64"):
        train(_config("avazu", path, tmp_path / "run", 64), Environment(), quiet=True)


def _bad_line_rank(rank, world_size, path, out, worker):
    env = Environment(rank=rank, world_size=world_size, local_world_size=world_size, backend="gloo")
    config = _config("criteo", path, f"{out}/run", 16, prefetch=0 if worker == "inline" else 2, prefetch_worker=
                     "auto" if worker == "inline" else worker)  # fmt: skip
    config.fault.timeout_s = 20.0
    train(config, env, quiet=True)


@pytest.mark.parametrize("worker", ["process", "thread", "inline"])
def test_a_bad_line_met_by_one_rank_stops_every_rank(tmp_path, worker):
    lines = tables.criteo_lines(400, seed=1)
    lines[16 * 2 * 5 + 16 + 3] = "1\tnot\ta\tcriteo\tline"  # line 180: step 5's block of rank 1
    path = tables.write_lines(tmp_path / "day.tsv", lines)
    with pytest.raises(AssertionError) as failed:
        run_multi_process(_bad_line_rank, world_size=2, timeout=60, path=str(path), out=str(tmp_path), worker=worker)
    report = str(failed.value)
    assert report.startswith("rank 1 failed:")  # the root cause leads: the rank that met the line
    assert f"ValueError: {path}:180: expected 40 tab-separated fields, got 5" in report
    assert "rank 0 failed too" in report  # it stopped, it did not hang
    assert "did not finish" not in report


def test_batches_read_by_a_worker_process_or_thread_train_as_read_inline(tmp_path):
    path = tables.write_lines(tmp_path / "behaviour.tsv", tables.sequence_lines(800, seed=3))
    losses = {}
    for worker in ("process", "thread", "inline"):
        config = _config("sequence", path, tmp_path / worker, 32, prefetch=0 if worker == "inline" else 3,
                         prefetch_worker="auto" if worker == "inline" else worker, eval_fraction=0.1)  # fmt: skip
        config.train.steps, config.train.epochs = 0, 2
        result = train(config, Environment(), quiet=True)
        losses[worker] = (result.losses, result.final_eval.auc)
    assert losses["process"] == losses["thread"] == losses["inline"]
    assert len(losses["inline"][0]) > 30


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.source=binary", "data.train_paths=[no_such_dir]"], "error: data: Invalid directory='no_such_dir'"),
        (["data.source=text", "data.train_paths=[{csv}]", "data.schema={{label: click, sparse: [{{name: nope, "
          "num_embeddings: 5}}]}}"], "error: data: {csv}: no column 'nope'; the columns are"),
        (["data.source=text", "data.train_paths=[{csv}]", "data.schema=missing.yaml"], "error: data: Cannot read schema file missing.yaml"),
        (["data.eval_fraction=0.1", "data.eval_paths=[{csv}]", "data.source=criteo_text", "data.train_paths=[{csv}]",
          "data.num_embeddings_per_feature=[97]"], "error: Invalid data.eval_fraction=0.1. Must be 0 when data.eval_paths"),
    ],
)
def test_data_errors_found_while_building_are_one_error_line_and_exit_code_2(tmp_path, overrides, message):
    import subprocess
    import sys

    csv = tables.write_lines(tmp_path / "a.csv", tables.avazu_lines(10))
    args = [a.format(csv=csv) for a in overrides]
    sizes = [] if any(a.startswith("data.num_embeddings") for a in args) else ["data.num_embeddings_per_feature=[]"]
    done = subprocess.run([sys.executable, "-m", "dist_rec.train", "--config", "launch/configs/tiny.yaml", *sizes,
                           f"train.output_dir={tmp_path / 'run'}", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith(message.format(csv=csv)), done.stderr
    assert "Traceback" not in done.stderr


def test_the_criteo_converter_says_why_nothing_was_written(tmp_path, capsys):
    from dist_rec.data.convert_criteo import main as convert_criteo

    path = tables.write_lines(tmp_path / "junk.tsv", ["not\ta criteo line"] * 20)
    assert convert_criteo(["--num-embeddings", "10", "--on-error", "skip", "--out", str(tmp_path / "bin"), str(path)]) == 1
    err = capsys.readouterr().err
    assert "No usable sample: 20 of 20 lines skipped in" in err and "(field_count 20)" in err
    assert f"{path}:1: expected 40 tab-separated fields, got 2" in err
    assert not (tmp_path / "bin").exists()


def test_an_eval_dataset_with_other_vocabularies_is_refused(tmp_path):
    from dist_rec.config import ConfigError

    schema = Schema.from_dict(tables.MOVIELENS_SCHEMA)
    convert([tables.write_lines(tmp_path / "train.csv", tables.movielens_lines(300, seed=1))], schema, tmp_path / "train")
    convert([tables.write_lines(tmp_path / "test.csv", tables.movielens_lines(100, seed=2))], schema, tmp_path / "test")
    tiny = yaml.safe_load(open("launch/configs/tiny.yaml"))
    tiny["data"] = {"source": "binary", "train_paths": [str(tmp_path / "train")], "eval_paths": [str(tmp_path / "test")]}
    tiny["train"]["output_dir"] = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"its vocabularies differ from the training dataset's.*--fitted-from"):
        train(TrainConfig.from_dict(tiny), Environment(), quiet=True)
