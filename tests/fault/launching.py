"""Running real fault-tolerant jobs from the tests: the launcher, the test
worker (``ft_worker.py``), and what the job left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ft_worker.py")
TINY = REPO / "launch" / "configs" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """What a finished job left: its output, its events, the worker dumps."""

    def __init__(self, root: Path, proc: subprocess.CompletedProcess) -> None:
        self.root, self.proc = root, proc
        self.output = root / "out"
        self.dumps = root / "dumps"

    @property
    def log(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def events(self, event: Optional[str] = None) -> List[Dict]:
        path = self.output / "fault_events.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        return [r for r in records if event is None or r["event"] == event]

    def summary(self) -> Dict:
        return json.loads((self.output / "summary.json").read_text())

    def dump(self, rank: int, incarnation: int, moment: str) -> Dict:
        return torch.load(self.dumps / f"rank{rank}.{incarnation}.{moment}.pt", weights_only=True)

    def dump_names(self) -> List[str]:
        return sorted(p.name for p in self.dumps.glob("*.pt"))


def command(nproc: int, port: int, overrides: Sequence[str], nnodes: int = 1, node_rank: int = 0,
            host: str = "127.0.0.1") -> List[str]:  # fmt: skip
    return [
        sys.executable, "-m", "dist_rec.fault.launch", "--nproc-per-node", str(nproc), "--nnodes", str(nnodes),
        "--node-rank", str(node_rank), "--store", f"{host}:{port}", str(WORKER), "--config", str(TINY), *overrides,
    ]  # fmt: skip


def job_env(root: Path, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["DIST_REC_TEST_DUMPS"] = str(root / "dumps")
    env.update(extra or {})
    return env


def run_job(root: Path, nproc: int, overrides: Sequence[str], timeout: float = 300) -> Job:
    """One node's launcher with ``nproc`` workers of ``tiny.yaml`` plus
    ``overrides``; output, checkpoints and dumps under ``root``."""
    overrides = [f"train.output_dir={root / 'out'}", *overrides]
    proc = subprocess.run(command(nproc, free_port(), overrides), env=job_env(root), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return Job(root, proc)


def assert_shards_equal(a: Dict, b: Dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: shards {sorted(a)} vs {sorted(b)}"
    for key in a:
        (wa, sa), (wb, sb) = a[key], b[key]
        assert torch.equal(wa, wb), f"{what}: {key} weights differ (max {float((wa - wb).abs().max()):.3g})"
        assert sa.keys() == sb.keys(), f"{what}: {key} states {sorted(sa)} vs {sorted(sb)}"
        for name in sa:
            assert torch.equal(sa[name], sb[name]), f"{what}: {key} state {name} differs"
