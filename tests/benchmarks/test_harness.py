"""The pure parts of benchmarks/harness.py: rounds, medians and ratios, the
benchmark page's section writer, the Markdown table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import harness  # noqa: E402
from harness import (  # noqa: E402
    busy_note,
    command_line,
    markdown_table,
    median_fields,
    per_round_ratios,
    ratio_cell,
    round_order,
    rotated,
    run_rounds,
    spread,
    update_section,
    write_json,
)

# ---------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------


def test_round_order_alternates_forward_and_backward():
    assert [round_order("abc", r) for r in range(4)] == [list("abc"), list("cba"), list("abc"), list("cba")]


def test_round_order_fixed_keeps_the_order():
    assert [round_order(["x", "y"], r, order="fixed") for r in range(3)] == [["x", "y"]] * 3


def test_round_order_rejects_unknown_orders():
    with pytest.raises(ValueError, match="order"):
        round_order(["x"], 0, order="shuffle")


def test_rotated_starts_each_step_one_further():
    assert [rotated(["a", "b", "c"], s) for s in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def test_run_rounds_calls_in_round_order_and_groups_results_by_variant():
    calls = []

    def measure(variant, r):
        calls.append((variant, r))
        return {"variant": variant, "round": r}

    results = run_rounds(["a", "b", "c"], 3, measure)
    assert calls == [("a", 0), ("b", 0), ("c", 0), ("c", 1), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("c", 2)]
    assert list(results) == ["a", "b", "c"]
    assert results["b"] == [{"variant": "b", "round": r} for r in range(3)]


def test_run_rounds_takes_any_hashable_variants():
    results = run_rounds([("x", "plain"), ("x", "pipeline")], 2, lambda v, r: {"r": r}, order="fixed")
    assert results == {("x", "plain"): [{"r": 0}, {"r": 1}], ("x", "pipeline"): [{"r": 0}, {"r": 1}]}


# ---------------------------------------------------------------------------
# Medians and ratios
# ---------------------------------------------------------------------------


def test_median_fields_takes_numeric_medians_and_keeps_the_rest_from_round_one():
    results = [
        {"step_ms": 3.0, "threads": 2, "name": "first", "nested": {"a": 1}},
        {"step_ms": 1.0, "threads": 4, "name": "second", "nested": {"a": 2}},
        {"step_ms": 2.0, "threads": 2, "name": "third", "nested": {"a": 3}},
    ]
    assert median_fields(results) == {"step_ms": 2.0, "threads": 2, "name": "first", "nested": {"a": 1}}
    assert results[0]["step_ms"] == 3.0  # the inputs are left alone


def test_median_fields_of_even_counts_and_empty_dicts():
    assert median_fields([{"x": 1.0}, {"x": 2.0}]) == {"x": 1.5}
    assert median_fields([{}, {}]) == {}


def test_per_round_ratios_pair_rounds():
    ours = [{"step_ms": 2.0}, {"step_ms": 4.0}]
    theirs = [{"step_ms": 3.0}, {"step_ms": 10.0}]
    assert per_round_ratios(theirs, ours) == [1.5, 2.5]
    assert per_round_ratios([{"t": 1.0}], [{"t": 4.0}], key="t") == [0.25]


def test_spread_is_median_min_max():
    assert spread([3.0, 1.0, 2.0, 10.0]) == (2.5, 1.0, 10.0)
    assert spread(iter([5.0])) == (5.0, 5.0, 5.0)


def test_ratio_cell_formats_as_the_tables_do():
    assert ratio_cell([1.2, 1.0, 1.4]) == "**1.20x** (1.00-1.40, 3 rounds)"
    assert ratio_cell([1.2345, 1.0], digits=3, count_rounds=False) == "**1.117x** (1.000-1.234)"
    assert ratio_cell([]) == "-"
    assert ratio_cell(None) == "-"


# ---------------------------------------------------------------------------
# The machine and the page
# ---------------------------------------------------------------------------


def test_busy_note_only_above_the_threshold():
    assert busy_note([harness.BUSY_LOAD_AVERAGE, 0.0, 0.0]) == ""
    assert "load average 1.7" in busy_note([1.7, 0.0, 0.0])


def test_command_line_quotes_the_script_under_benchmarks():
    assert command_line("/any/where/bench_x.py", ["--steps", "2"]) == "python benchmarks/bench_x.py --steps 2"
    assert command_line("bench_x.py", []) == "python benchmarks/bench_x.py"


def test_markdown_table():
    assert markdown_table(["a", "b"], [["1", 2], ["x", "-"]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| x | - |"
    assert markdown_table(["only"], []) == "| only |\n|---|"


PAGE = """# Benchmarks

<!-- cpu:begin -->
## CPU
old cpu
<!-- cpu:end -->

<!-- gpu:begin -->
## GPU
old gpu
<!-- gpu:end -->

Trailing text.
"""


def test_update_section_replaces_only_its_section(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE)
    update_section(page, "cpu", "\n## CPU\nnew cpu\n\n")
    assert page.read_text() == PAGE.replace("old cpu", "new cpu")


def test_update_section_keeps_the_markers_and_rewrites_repeatably(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE)
    update_section(page, "gpu", "## GPU\nfirst")
    update_section(page, "gpu", "## GPU\nsecond")
    text = page.read_text()
    assert "<!-- gpu:begin -->\n## GPU\nsecond\n<!-- gpu:end -->\n\nTrailing text.\n" in text
    assert text.count("<!-- gpu:begin -->") == text.count("<!-- gpu:end -->") == 1
    assert "old cpu" in text and "first" not in text


def test_update_section_appends_a_missing_section(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE)
    update_section(page, "train", "## Train\nrows")
    assert page.read_text() == PAGE + "\n<!-- train:begin -->\n## Train\nrows\n<!-- train:end -->\n"


def test_update_section_does_not_confuse_names_sharing_a_prefix(tmp_path):
    page = tmp_path / "communication.md"
    update_section(page, "comm_measured", "measured")
    update_section(page, "comm", "comm")
    update_section(page, "comm_measured", "measured again")
    assert page.read_text() == (
        "# Benchmarks\n\n<!-- comm_measured:begin -->\nmeasured again\n<!-- comm_measured:end -->\n\n"
        "<!-- comm:begin -->\ncomm\n<!-- comm:end -->\n"
    )


def test_update_section_creates_the_page(tmp_path, capsys):
    page = tmp_path / "docs" / "new.md"
    update_section(page, "cpu", "text")
    assert page.read_text() == "# Benchmarks\n\n<!-- cpu:begin -->\ntext\n<!-- cpu:end -->\n"
    assert f"wrote the cpu section of {page}" in capsys.readouterr().out


def test_write_json_creates_its_folder_and_replaces_a_file_whole(tmp_path):
    path = tmp_path / "runs" / "nested" / "bench.json"  # runs/ is not in a fresh clone
    write_json(path, {"rows": [1, 2]}, indent=1)
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    write_json(path, {"rows": [3]})
    assert json.loads(path.read_text()) == {"rows": [3]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["bench.json"]  # no partial file left

