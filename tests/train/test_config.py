"""Config files, overrides, and refusal of invalid values by name."""

from pathlib import Path

import pytest

from dist_rec.config import ConfigError, TrainConfig, load_config
from dist_rec.train import main

CONFIGS = sorted(Path("launch/configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    config = load_config(str(path))
    assert isinstance(config, TrainConfig)


def test_overrides_apply_on_top_of_the_file():
    config = load_config("launch/configs/tiny.yaml", ["train.steps=7", "model.over_arch_layer_sizes=[4, 1]", "optimizer.dense=adam"])
    assert config.train.steps == 7
    assert config.model.over_arch_layer_sizes == [4, 1]
    assert config.optimizer.dense == "adam"
    assert config.model.embedding_dim == 8  # from the file


def test_yaml_round_trip():
    config = load_config("launch/configs/default.yaml")
    assert TrainConfig.from_dict(__import__("yaml").safe_load(config.to_yaml())) == config


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.batch_size=0", "Invalid train.batch_size=0. Must be >= 1."),
        ("train.steps=-3", "Invalid train.steps=-3. Must be >= 0."),
        ("train.steps=ten", "Invalid train.steps='ten'. Must be an integer."),
        ("optimizer.dense=lamb", "Invalid optimizer.dense='lamb'. Must be one of ['sgd', 'adagrad', 'adam', 'shampoo']."),
        ("optimizer.sparse_lr=0", "Invalid optimizer.sparse_lr=0.0. Must be > 0."),
        ("data.source=avro", "Invalid data.source='avro'. Must be one of"),
        ("optimizer.sparse_lr=.inf", "Invalid optimizer.sparse_lr=inf. Must be a finite number"),
        ("data.source=text", "Invalid data.train_paths=[]"),
        ("data.zipf_exponent=-1", "Invalid data.zipf_exponent=-1.0. Must be >= 0"),
        ("data.num_embeddings_per_feature=[10, 0]", "Invalid data.num_embeddings_per_feature=[10, 0]. Must be"),
        ("model.embedding_dim=12", "Invalid model.dense_arch_layer_sizes=[16, 8]. Must be a list ending in embedding_dim=12"),
        ("model.over_arch_layer_sizes=[8, 2]", "Invalid model.over_arch_layer_sizes=[8, 2]. Must be a list ending in 1"),
        ("model.interaction=cat", "Invalid model.interaction='cat'. Must be 'dot' or 'dcn'."),
        ("train.backend=mpi", "Invalid train.backend='mpi'. Must be one of"),
        ("checkpoint.delta_bits=2", "Invalid checkpoint.delta_bits=2. Must be one of [32, 8, 4]"),
        ("train.batchsize=3", "Unknown config key 'train.batchsize'. Valid keys under 'train'"),
        ("trainer.steps=3", "Unknown config key 'trainer'"),
        ("train.steps", "Invalid override 'train.steps'. Must be section.field=value"),
    ],
)
def test_invalid_values_are_refused_by_name(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("launch/configs/tiny.yaml", [override])
    assert message in str(info.value)


def test_criteo_source_needs_paths():
    with pytest.raises(ConfigError, match=r"Invalid data.train_paths=\[\]. Must be at least one path"):
        load_config(None, ["data.source=criteo_text", "data.num_embeddings_per_feature=[1000]"])


def test_bad_config_file_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_command_line_reports_the_invalid_value(capsys):
    assert main(["--config", "launch/configs/tiny.yaml", "train.batch_size=-4"]) == 2
    assert "Invalid train.batch_size=-4. Must be >= 1." in capsys.readouterr().err


def test_shampoo_settings_are_checked_by_the_optimizer():
    config = load_config("launch/configs/default.yaml", ["optimizer.dense=shampoo", "optimizer.shampoo.precondition_frequency=10"])
    assert config.optimizer.shampoo.optimizer_kwargs()["precondition_frequency"] == 10
    with pytest.raises(ConfigError, match=r"optimizer.shampoo: Invalid grafting='lion'"):
        load_config("launch/configs/default.yaml", ["optimizer.dense=shampoo", "optimizer.shampoo.grafting=lion"])
    with pytest.raises(ConfigError, match=r"optimizer.shampoo.betas"):
        load_config("launch/configs/default.yaml", ["optimizer.dense=shampoo", "optimizer.shampoo.betas=[0.9]"])


def test_float_settings_accept_exponents_without_a_dot():
    config = load_config("launch/configs/default.yaml", ["optimizer.shampoo.epsilon=1e-6"])
    assert config.optimizer.shampoo.epsilon == 1e-6


def test_quantised_deltas_need_a_policy_with_deltas():
    with pytest.raises(ConfigError, match=r"Invalid checkpoint.delta_bits=4. Must be 32 with checkpoint.policy='full'"):
        load_config("launch/configs/tiny.yaml", ["checkpoint.delta_bits=4"])
    assert load_config("launch/configs/tiny.yaml", ["checkpoint.policy=mfu", "checkpoint.delta_bits=4"]).checkpoint.delta_bits == 4
