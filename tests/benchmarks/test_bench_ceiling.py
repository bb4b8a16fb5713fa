"""The native ceiling loops of benchmarks/bench_ceiling.py against plain
PyTorch: a ceiling that computed something else would measure nothing."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_ceiling  # noqa: E402


@pytest.fixture(scope="module")
def native():
    return bench_ceiling.load_native()


def _bags(seed: int, tables: int, rows: int, batch: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (tables * batch,), generator=g)
    lengths[::7] = 0  # empty bags
    offsets = torch.zeros(tables * batch + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    ids = torch.randint(0, rows, (int(offsets[-1]),), generator=g)
    ids[: ids.numel() // 3] = 2  # repeated ids
    return ids, offsets


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("distance,hint", [(0, "t0"), (8, "t1"), (16, "t2"), (32, "t0")])
def test_pooled_read_sums_each_bag(native, seed, dim, distance, hint):
    tables, rows, batch = 3, 50, 40
    weights = [torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed + t)) for t in range(tables)]
    ids, offsets = _bags(seed, tables, rows, batch)
    out = torch.full((tables * batch, dim), float("nan"))
    bench_ceiling.pooled_read(native, weights, ids, offsets, batch, distance, out, hint)
    for t in range(tables):
        bag_offsets = offsets[t * batch : (t + 1) * batch + 1]
        start = int(bag_offsets[0])
        expected = torch.nn.functional.embedding_bag(
            ids[start : int(bag_offsets[-1])], weights[t], bag_offsets - start, mode="sum", include_last_offset=True
        )
        torch.testing.assert_close(out[t * batch : (t + 1) * batch], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_state", [False, True], ids=["rows", "rows_and_state"])
@pytest.mark.parametrize("dim", [16, 64, 256])
@pytest.mark.parametrize("hint", ["w", "t1", "t2"])
def test_update_rows_changes_each_listed_row_once(native, hint, dim, with_state):
    tables, rows = 2, 300
    weights = [torch.randn(rows, dim, generator=torch.Generator().manual_seed(t)) for t in range(tables)]
    states = [torch.randn(rows, generator=torch.Generator().manual_seed(10 + t)) for t in range(tables)]
    before, states_before = [w.clone() for w in weights], [s.clone() for s in states]
    listed = [torch.tensor([0, 5, 6, 299]), torch.arange(0, 300, 3)]
    starts = torch.tensor([0, 4, 4 + listed[1].numel()])
    bench_ceiling.update_rows(native, weights, torch.cat(listed), starts, 2.0, 1.0, 16, hint,
                              states if with_state else None)  # fmt: skip
    for t in range(tables):
        expected = before[t].clone()
        expected[listed[t]] = expected[listed[t]] * 2.0 + 1.0
        torch.testing.assert_close(weights[t], expected, rtol=0, atol=1e-6)
        expected_state = states_before[t].clone()
        if with_state:
            expected_state[listed[t]] = expected_state[listed[t]] * 2.0 + 1.0
        torch.testing.assert_close(states[t], expected_state, rtol=0, atol=1e-6)


def test_states_of_the_wrong_shape_or_type_are_refused(native):
    weights = [torch.zeros(10, 16), torch.zeros(20, 16)]
    rows, starts = torch.tensor([1, 2]), torch.tensor([0, 1, 2])
    wrong = (
        [torch.zeros(10), torch.zeros(10)],  # the second table has 20 rows
        [torch.zeros(10), torch.zeros(20, dtype=torch.float64)],
        [torch.zeros(10), torch.zeros(40)[::2]],  # not contiguous
    )
    for states in wrong:
        with pytest.raises(ValueError, match="one contiguous float32 per row"):
            bench_ceiling.update_rows(native, weights, rows, starts, 1.0, 0.0, 8, "t1", states)
    assert all(bool((w == 0).all()) for w in weights)


def test_the_loops_are_as_wide_as_the_cpus_vectors(native):
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    widest = [isa for flag, isa in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags]
    expected = widest[0] if widest else "SSE" if platform.machine() == "x86_64" else "16-byte vectors"
    assert native.ceiling_isa().decode() == expected


def test_a_dim_without_a_loop_is_refused(native):
    weights = [torch.zeros(4, 24)]
    with pytest.raises(ValueError, match="no loop for dim 24"):
        bench_ceiling.pooled_read(native, weights, torch.zeros(1, dtype=torch.int64), torch.tensor([0, 1]), 1, 0,
                                  torch.empty(1, 24))  # fmt: skip


def test_the_sums_stay_in_registers(native, machine_code, stack_fill):
    """No loop zeroes an accumulator array on the stack (a row wider than 16
    vector registers once did: memset, then a load and a store per vector)."""
    loops = machine_code(native._name, r"(pooled_read|update_rows)_v<")
    assert len(loops) >= 10, sorted(loops)  # 5 dims x 2 loops (unless inlined into the dispatch)
    fills = {n: line for n, body in loops.items() for line in body if stack_fill.search(line)}
    assert not fills, fills


def test_the_table_reports_both_ceilings():
    """The step's share of the rows-only ceiling (the issue's measure) and of
    the one that also steps each row's optimizer state, from the same medians."""
    result = dict(config="8x1,000x64 B=4 uniform", ids=80.0, unique=64.0, row_bytes=256, threads=2, isa="AVX2",
                  read_s=0.002, rmw_s=0.003, rmw_state_s=0.004, forward_s=0.004, step_s=0.010)  # fmt: skip
    text = bench_ceiling.markdown([result], ["--dims", "64"], [0.0, 0.0, 0.0])
    header = next(line for line in text.splitlines() if line.startswith("| config"))
    row = next(line for line in text.splitlines() if line.startswith("| 8x1,000x64"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cells["rmw ms"] == "3.0" and cells["rmw + state ms"] == "4.0"
    assert cells["forward / ceiling"] == "**50%**"
    assert cells["step / ceiling"] == "**50%**"  # (2 + 3) / 10
    assert cells["step / ceiling with state"] == "60%"  # (2 + 4) / 10
