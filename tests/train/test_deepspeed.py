"""DeepSpeed ZeRO-1/2 as the dense engine trains like DDP: 2 gloo processes,
DLRM with dist_rec-sharded tables, 20 steps, the same losses and parameters.

DeepSpeed is installed by ``make install``; nothing here skips without it:
a missing or JIT-compiling DeepSpeed fails these tests.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_rec.config import ConfigError, load_config
from dist_rec.testing.multi_process import run_multi_process
from dist_rec.train import Environment, train

ROOT = Path(__file__).resolve().parents[2]
# (dense optimizer, sharding): every dense optimizer, three table shardings.
CASES = [("adagrad", "table_wise"), ("adam", "row_wise"), ("sgd", "column_wise")]
ENGINES = [("ddp", 2), ("deepspeed", 1), ("deepspeed", 2)]


def _config(dense: str, sharding: str, engine: str, stage: int, out: str):
    config = load_config(
        "launch/configs/tiny.yaml",
        [
            "train.batch_size=8",
            "train.steps=20",
            "train.log_every=1",
            "train.eval_every=0",
            f"train.output_dir={out}",
            f"optimizer.dense={dense}",
            "data.mean_bag_length=2.5",
            f"train.dense_engine={engine}",
            f"train.zero_stage={stage}",
        ],
    )
    config.sharding.type = sharding
    return config


def _name(dense, sharding, engine, stage) -> str:
    return f"{dense}-{sharding}-{engine}{stage if engine == 'deepspeed' else ''}"


def _train_rank(rank, world_size, out):
    """Every case on the same two processes: DeepSpeed is imported once."""
    env = Environment(rank=rank, world_size=world_size, local_world_size=world_size, backend="gloo")
    for dense, sharding in CASES:
        for engine, stage in ENGINES:
            name = _name(dense, sharding, engine, stage)
            result = train(_config(dense, sharding, engine, stage, f"{out}/{name}"), env, quiet=True)
            tables, _ = result.model.sparse_arch.gather_unsharded()  # a collective
            record = {}
            if result.dense_engine is not None:
                zero = result.dense_engine.optimizer
                record["zero"] = {
                    "class": type(zero).__name__,
                    "stage": result.dense_engine.engine.zero_optimization_stage(),
                    "local_elements": sum(p.numel() for p in zero.single_partition_of_fp32_groups),
                }
            record["dense"] = {k: v for k, v in result.model.state_dict().items() if not k.startswith("sparse_arch.")}
            torch.save(record, f"{out}/{name}.rank{rank}.pt")
            if rank == 0:
                record.update(losses=result.losses, tables=tables)
                torch.save(record, f"{out}/{name}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    run_multi_process(_train_rank, world_size=2, timeout=300, out=str(out))
    return out


@pytest.mark.parametrize("stage", [1, 2], ids=["zero1", "zero2"])
@pytest.mark.parametrize("dense,sharding", CASES, ids=[f"{d}-{s}" for d, s in CASES])
def test_zero_trains_like_ddp(runs, dense, sharding, stage):
    ddp = torch.load(runs / f"{_name(dense, sharding, 'ddp', 2)}.pt")
    ds = torch.load(runs / f"{_name(dense, sharding, 'deepspeed', stage)}.pt")
    assert len(ddp["losses"]) == len(ds["losses"]) == 20
    torch.testing.assert_close(torch.tensor(ds["losses"]), torch.tensor(ddp["losses"]), rtol=0, atol=1e-5)
    assert set(ds["dense"]) == set(ddp["dense"])
    for name, tensor in ddp["dense"].items():
        torch.testing.assert_close(ds["dense"][name], tensor, rtol=0, atol=1e-5, msg=name)
    for name, tensor in ddp["tables"].items():
        torch.testing.assert_close(ds["tables"][name], tensor, rtol=0, atol=1e-5, msg=name)
    # Not trivially equal: training moved the parameters.
    assert ddp["losses"][-1] < ddp["losses"][0]


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_partitions_the_dense_optimizer(runs, stage):
    """DeepSpeed really owns the dense step: each rank keeps only its slice
    of the fp32 parameters the optimizer steps, and both ranks end equal."""
    dense, sharding = CASES[0]
    name = _name(dense, sharding, "deepspeed", stage)
    ranks = [torch.load(runs / f"{name}.rank{r}.pt") for r in range(2)]
    total = sum(t.numel() for t in ranks[0]["dense"].values() if t.is_floating_point())
    for record in ranks:
        assert record["zero"]["class"] == "DeepSpeedZeroOptimizer"
        assert record["zero"]["stage"] == stage
        assert record["zero"]["local_elements"] < total
    assert sum(r["zero"]["local_elements"] for r in ranks) >= total
    for key, tensor in ranks[0]["dense"].items():
        torch.testing.assert_close(ranks[1]["dense"][key], tensor, rtol=0, atol=0, msg=key)


# -- installation and refusals ------------------------------------------------


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_deepspeed_is_installed_pinned_with_its_shm_op_prebuilt():
    pinned = next(
        line.split("==")[1].strip()
        for line in (ROOT / "requirements-deepspeed.txt").read_text().splitlines()
        if line.startswith("deepspeed==")
    )
    code = (
        "import importlib.util, deepspeed, torch\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "a = get_accelerator()\n"
        "print(deepspeed.__version__, a.device_name(), a.communication_backend_name(), torch.__version__,\n"
        "      importlib.util.find_spec('deepspeed.ops.comm.deepspeed_shm_comm_op') is not None)\n"
    )
    done = _python(code, DS_ACCELERATOR="cpu")
    assert done.returncode == 0, done.stderr
    version, device, backend, torch_version, shm_prebuilt = done.stdout.split()[-5:]
    assert version == pinned
    assert (device, backend) == ("cpu", "gloo")
    assert torch_version == torch.__version__  # installing DeepSpeed left our torch alone
    assert shm_prebuilt == "True", "the shm comm op was not built at install: every run would compile it"


def test_the_core_does_not_import_deepspeed():
    done = _python(
        "import sys, dist_rec, dist_rec.train, dist_rec.engines, dist_rec.sharding\n"
        "assert 'deepspeed' not in sys.modules, 'the core imported DeepSpeed'\n"
    )
    assert done.returncode == 0, done.stderr


def test_a_missing_deepspeed_says_how_to_install(monkeypatch):
    from dist_rec.engines import deepspeed_engine

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed now raises ImportError
    with pytest.raises(ImportError, match="make install"):
        deepspeed_engine.import_deepspeed()


def test_one_process_is_refused(tmp_path):
    config = _config("adagrad", "table_wise", "deepspeed", 2, str(tmp_path))
    with pytest.raises(ConfigError, match="Invalid train.dense_engine='deepspeed'. Must be 'ddp' for a single process"):
        train(config, Environment(), quiet=True)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.dense_engine=horovod"], "Invalid train.dense_engine='horovod'. Must be one of ['ddp', 'deepspeed']."),
        (["train.zero_stage=3"], "Invalid train.zero_stage=3. Must be one of [1, 2]"),
        (
            ["train.dense_engine=deepspeed", "train.checkpoint_dir=ckpt"],
            "Invalid train.checkpoint_dir='ckpt'. Must be '' with train.dense_engine='deepspeed'",
        ),
    ],
)
def test_invalid_deepspeed_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("launch/configs/tiny.yaml", overrides)
    assert message in str(info.value)


def test_deepspeed_with_shampoo_is_refused(monkeypatch):
    """Shampoo preconditions whole parameter blocks; ZeRO would hand it flat
    slices. (Checked as if the config already offered Shampoo.)"""
    import dist_rec.config as config_module

    monkeypatch.setattr(config_module, "DENSE_OPTIMIZERS", (*config_module.DENSE_OPTIMIZERS, "shampoo"))
    load_config("launch/configs/tiny.yaml", ["optimizer.dense=shampoo"])  # fine under DDP
    with pytest.raises(ConfigError, match=r"Invalid optimizer.dense='shampoo'. Must be one of \['sgd', 'adagrad', 'adam'\] with train.dense_engine='deepspeed' \(Shampoo"):
        load_config("launch/configs/tiny.yaml", ["optimizer.dense=shampoo", "train.dense_engine=deepspeed"])


def test_the_deepspeed_main_job_is_the_main_job_with_deepspeed():
    main = load_config("launch/configs/default.yaml")
    ds = load_config("launch/configs/default_deepspeed.yaml")
    assert ds.train.dense_engine == "deepspeed"
    ds.train.dense_engine, ds.train.zero_stage, ds.train.output_dir = "ddp", main.train.zero_stage, main.train.output_dir
    assert ds == main
