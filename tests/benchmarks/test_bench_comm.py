"""benchmarks/bench_comm.py against dist_rec itself: on 4 gloo processes (1D
and 2D, row- and table-wise) its model must give, per rank and kind, the
bytes ``DistributedModelParallel`` really sends once the ids each rank sent
are known, and its measured path must run at all (it once read a grid
attribute that had moved); its table-wise model must place the tables where
``table_wise_plan`` does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_comm  # noqa: E402


def test_the_byte_model_matches_what_four_processes_send(tmp_path):
    out = tmp_path / "comm.json"
    bench_comm.main(["--worlds", "4", "--steps", "2", "--batch", "32", "--rows", "400", "--json", str(out)])
    rows = json.loads(out.read_text())["measured"]
    configs = {(r["G"], r["sharding"]) for r in rows}
    assert configs == {(1, "row_wise"), (2, "row_wise"), (1, "table_wise"), (2, "table_wise")}, configs
    for r in rows:
        assert r["exact_gap"] < 0.5, r  # bytes per rank and step, every kind
        assert sum(r["measured"].values()) > 0, r


def test_the_table_wise_model_places_tables_as_table_wise_plan():
    from dist_rec.optim import RowWiseAdagrad
    from dist_rec.planner import table_wise_plan

    rows, dims, batch = (50, 4000, 60, 4000, 70, 4000), (16, 16, 64, 16, 16, 16), 8
    plan = table_wise_plan(bench_comm.table_configs(rows, dims), 2, optimizer=RowWiseAdagrad(lr=0.1))
    expected = [plan.tables[f"t{t}"].ranks[0] for t in range(len(rows))]
    assert expected != [t % 2 for t in range(len(rows))]  # the case round-robin would get wrong
    workload = bench_comm.Workload("w", rows, dims, batch, (1.0,) * len(rows))
    assert list(bench_comm.table_wise_ranks(workload, 2)) == expected
    widths = bench_comm.predict(workload, 2, 1, "table_wise")["output_dist"] / (4 * batch)  # 4 B (L - 1) W_r
    assert list(widths) == [sum(d for d, r in zip(dims, expected) if r == q) for q in range(2)]
