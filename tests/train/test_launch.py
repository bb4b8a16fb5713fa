"""The launch path end to end: torchrun with 2 gloo processes through
launch/train.sh, and a plain single process, on the tiny config."""

import json
import os
import subprocess
import sys
from pathlib import Path

from dist_rec.testing.multi_process import free_port

ROOT = Path(__file__).resolve().parents[2]


def _records(output_dir: Path):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _check_outputs(output_dir: Path, steps: int, processes: int):
    records = _records(output_dir)
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(10, steps + 1, 10))
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, steps]
    assert all(0.5 < r["auc"] <= 1 and 0 < r["ne"] < 1.2 for r in evals)
    png = (output_dir / "training.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["processes"] == processes and summary["steps"] == steps
    assert summary["examples"] == steps * 64 * processes
    assert summary["examples_per_second"] > 0 and 0.5 < summary["teacher_auc"] < 1


def test_torchrun_two_processes(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", GLOO_SOCKET_IFNAME="lo")
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(ROOT / "launch/train.sh"), "--config", "launch/configs/tiny.yaml", f"train.output_dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "2 process(es) (gloo, cpu)" in text
    assert "step     40/40" in text and "== dist_rec training summary" in text
    assert "eval AUC" in text and "teacher" in text and "training.png" in text
    _check_outputs(out, steps=40, processes=2)


def test_single_process_without_torchrun(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "dist_rec.train", "--config", "launch/configs/tiny.yaml", f"train.output_dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 process(es)" in proc.stdout
    _check_outputs(out, steps=40, processes=1)


def test_invalid_override_fails_before_launching_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dist_rec.train", "--config", "launch/configs/tiny.yaml", "optimizer.sparse=adam"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Invalid optimizer.sparse='adam'. Must be one of" in proc.stderr
