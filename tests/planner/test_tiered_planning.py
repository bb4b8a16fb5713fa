"""``sharding.type: planned``: the trainer profiles its own data, plans
which rows stay in memory (RecShard or table-level greedy) under a memory
budget, keeps the rest on SSD, and trains exactly as the same tables all in
memory; the plan, its figures and the statistics are saved beside the run.
"""

import json

import pytest
import torch

from dist_rec.config import ConfigError, load_config
from dist_rec.placement.tiered import TieredStorage
from dist_rec.planner import ShardingPlan
from dist_rec.trainer import Environment, Trainer


def _config(out, **overrides):
    values = ["train.batch_size=32", "train.steps=12", "train.log_every=4", "train.eval_every=0",
              f"train.output_dir={out}"] + [f"{k}={v}" for k, v in overrides.items()]  # fmt: skip
    return load_config("launch/configs/tiny.yaml", values)


@pytest.mark.parametrize("placement", ["recshard", "greedy"])
def test_a_planned_run_trains_as_the_same_tables_in_memory(tmp_path, placement):
    # 650 rows x (8 floats + 1 state): a 0.01 MiB budget keeps about 290 of them in memory.
    planned = Trainer(_config(tmp_path / "planned", **{"sharding.type": "planned", "sharding.placement": placement,
                                                      "sharding.fast_memory_mb": 0.01, "sharding.stats_batches": 20}),
                      Environment(), quiet=True).train()  # fmt: skip
    storages = [local.storage for local in planned.model.sparse_arch.local_shards()]
    assert any(isinstance(s, TieredStorage) and any(h < t.num_rows for h, t in zip(s.hot_rows, s.tables)) for s in storages)
    memory = Trainer(_config(tmp_path / "memory", **{"sharding.type": "table_wise", "train.checkpoint_dir": str(tmp_path / "c")}),
                     Environment(), quiet=True).train()  # fmt: skip
    assert torch.allclose(torch.tensor(planned.losses), torch.tensor(memory.losses), rtol=0, atol=1e-6)
    assert planned.final_eval.auc == pytest.approx(memory.final_eval.auc, abs=1e-6)

    out = tmp_path / "planned"
    plan = ShardingPlan.load(out / "plan.json")
    figures = json.loads((out / "placement.json").read_text())
    assert figures["method"] in (("milp", "greedy") if placement == "recshard" else ("table_greedy",))
    hot_bytes = sum(figures["hot_rows"].values()) * (8 * 4 + 4)
    assert hot_bytes <= 0.01 * 2**20
    assert all(s.hot_rows == figures["hot_rows"][name] for name, t in plan.tables.items() for s in t.shards)
    assert (out / "access_stats" / "summary.json").is_file() and (out / "access_stats" / "access_cdf.png").is_file()
    tiers = json.loads((out / "summary.json").read_text())["tiers_rank0"]
    assert tiers["hot_rows"] == sum(figures["hot_rows"].values()) < tiers["rows"] == 650
    assert tiers["cold_blocks_read_per_step"] > 0 and tiers["cold_blocks_written_per_step"] > 0


def test_a_planned_run_needs_a_memory_budget():
    with pytest.raises(ConfigError, match=r"sharding.fast_memory_mb=0.0.*> 0 with sharding.type=planned"):
        load_config("launch/configs/tiny.yaml", ["sharding.type=planned"])
    with pytest.raises(ConfigError, match=r"sharding.placement='lru'"):
        load_config("launch/configs/tiny.yaml", ["sharding.type=planned", "sharding.placement=lru", "sharding.fast_memory_mb=1"])
