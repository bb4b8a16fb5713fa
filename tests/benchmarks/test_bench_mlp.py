"""benchmarks/bench_mlp.py: its switch really changes what runs (fused op or
modules), and a short run of both measurements writes its section."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_mlp  # noqa: E402
from dist_rec.models.dlrm import DenseArch  # noqa: E402


def test_the_switch_selects_the_modules_or_the_fused_op():
    arch = DenseArch(5, [8, 4])
    x = torch.randn(3, 5)
    bench_mlp._set_fused([arch], "fused")
    assert type(arch(x).grad_fn).__name__ == "_FusedMLPBackward"
    bench_mlp._set_fused([arch], "modules")
    assert type(arch(x).grad_fn).__name__ == "ReluBackward0"


def test_a_short_run_writes_its_section(tmp_path):
    page = tmp_path / "benchmarks.md"
    bench_mlp.main(["--preset", "small", "--rounds", "2", "--calls", "2", "--steps", "2", "--warmup", "1",
                    "--markdown", str(page)])  # fmt: skip
    text = page.read_text()
    assert "<!-- mlp:begin -->" in text and "small: both arches, forward + backward" in text
    assert "small: whole dist_rec step" in text and text.count(", 2 rounds)") == 2
