"""launch/train.sh and launch/ft_train.sh take relative paths from the
directory they are run in: a relative --config and a relative
train.output_dir, run from a directory outside the checkout, mean files there
(the scripts once changed into the repository root first, so a user's
``--config my.yaml data.train_paths=[train.tsv]`` was not found)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_rec.testing.multi_process import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["train.sh", "ft_train.sh"])
def test_relative_paths_are_the_callers(tmp_path, script):
    caller = tmp_path / "caller"
    caller.mkdir()
    shutil.copy(ROOT / "launch/configs/tiny.yaml", caller / "my.yaml")
    port = str(free_port())
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE="1", GLOO_SOCKET_IFNAME="lo",
               RDZV_ENDPOINT=f"127.0.0.1:{port}", FT_STORE=f"127.0.0.1:{port}")  # fmt: skip
    env.pop("PYTHONPATH", None)  # the script finds the checkout itself
    proc = subprocess.run(
        [str(ROOT / "launch" / script), "--config", "my.yaml", "train.output_dir=out/run", "train.steps=20"],
        cwd=caller, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 process(es)" in proc.stdout and "== dist_rec training summary" in proc.stdout
    out = caller / "out" / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 1 and summary["steps"] == 20
    assert (out / "metrics.jsonl").is_file() and (out / "training.png").is_file()
    assert not (ROOT / "out" / "run").exists() and not (ROOT / "my.yaml").exists()
    assert sorted(p.name for p in caller.iterdir()) == ["my.yaml", "out"]
