"""Checkpoint series: asynchronous saves equal synchronous ones bitwise,
base plus deltas equal a full save bitwise (on the saving world and on
another), the policies save what they say (planted dirty rows and access
counts), a broken chain or a corrupt delta is refused before anything
changes, and the interval rules.

The model, plans and batches are those of ``test_checkpoint.py``; the
``Checkpointer`` is the trainer's, driven directly."""

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_rec.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dist_rec.checkpoint.delta import decode_rows
from dist_rec.checkpoint.files import component
from dist_rec.checkpoint.interval import (
    choose_interval, expected_pls, full_recovery_overhead, partial_recovery_interval, young_daly,
)  # fmt: skip
from dist_rec.config import CheckpointConfig
from dist_rec.testing.multi_process import run_multi_process
from dist_rec.trainer.checkpointing import Checkpointer
from test_checkpoint import _assert_same, _build, _snapshot, _train_step

PLAN_2 = {"t0": ("row_wise", [0, 1]), "t1": ("column_wise", [0, 1]), "t2": ("table_wise", [1])}
PLAN_1 = {"t0": ("column_wise", [0]), "t1": ("row_wise", [0]), "t2": ("data_parallel", [])}
PLAN_1_TABLES = {"t0": ("table_wise", [0]), "t1": ("table_wise", [0]), "t2": ("table_wise", [0])}


class _Position:
    """The trainer's data position, reduced to the step."""

    def position(self, step):
        return {"step": step}

    def seek(self, extra, directory):
        return extra["step"]


def _checkpointer(root, dmp, optimizer, key, **settings) -> Checkpointer:
    return Checkpointer(Path(root), 1, 1000, dmp, optimizer, _Position(), lambda *parts: None,
                        config=CheckpointConfig(**settings), group=dmp.process_groups.subgroup(key),
                        lock=dist.get_rank() == 0)  # fmt: skip


def _entries(root):
    return sorted(p.name for p in Path(root).iterdir() if p.name.startswith("step-"))


def _files(entry: Path):
    """File name -> sha256 of an entry (its content, bitwise)."""
    return {f["file"]: f["sha256"] for f in json.loads((entry / "manifest.json").read_text())["files"]}


# -- async = sync; base + deltas = full ---------------------------------------------


def _saves_rank(rank, world_size, root):
    dmp, optimizer = _build(PLAN_2, seed=1)
    sync = _checkpointer(os.path.join(root, "sync"), dmp, optimizer, "ck-sync", async_save=False, keep_last=3)
    background = _checkpointer(os.path.join(root, "async"), dmp, optimizer, "ck-async", keep_last=3)
    incremental = _checkpointer(os.path.join(root, "inc"), dmp, optimizer, "ck-inc", policy="incremental",
                                base_every=3, keep_last=2)  # fmt: skip
    twin, twin_optimizer = _build(PLAN_2, seed=1)  # the same training, its own row trackers
    # (background saves: the deltas are coded by the writer thread)
    quantised = _checkpointer(os.path.join(root, "q4"), twin, twin_optimizer, "ck-q4", policy="incremental",
                              base_every=3, keep_last=2, delta_bits=4)  # fmt: skip
    for step in range(6):
        _train_step(dmp, optimizer, step)
        _train_step(twin, twin_optimizer, step)
        incremental.save(step + 1)
        quantised.save(step + 1)
        if (step + 1) % 2 == 0:
            sync.save(step + 1)
            background.save(step + 1)  # written while the next steps train
    for checkpointer in (sync, background, incremental, quantised):
        checkpointer.finish()
        checkpointer.close()
    live = _snapshot(dmp, optimizer)
    _assert_same(_snapshot(twin, twin_optimizer), live, "the twin's training")

    # 4-bit deltas: a load rebuilds exactly the saver's reference, which is
    # within half a step of every live row (and exact wherever nothing changed).
    rebuilt = dict(live)
    for path, sharded in dmp.sharded.items():
        for local in sharded.local_shards():
            s = local.shard
            reference = quantised.buffers.references[f"{component(path)}/{component(local.table)}/r{s.row_offset}_c{s.col_offset}.pt"]
            key = (path, local.table, s.row_offset, s.col_offset, "weight")
            error = (reference - live[key]).abs().max()
            assert 0 < error < 0.02, (key, error)  # lossy, and only just
            rebuilt[key] = reference.clone()
    fresh, fresh_optimizer = _build(PLAN_2, seed=9)
    load_checkpoint(os.path.join(root, "q4"), fresh, fresh_optimizer)
    _assert_same(_snapshot(fresh, fresh_optimizer), rebuilt, "base + 4-bit deltas against the saver's reference")
    save_checkpoint(os.path.join(root, "q4_rebuilt"), fresh, fresh_optimizer, step=6)
    if rank == 0:
        assert [r["kind"] for r in incremental.saves] == ["base", "delta", "delta", "base", "delta", "delta"]
        assert all(r["rows_saved"] < r["rows_total"] for r in incremental.saves if r["kind"] == "delta")
    fresh, fresh_optimizer = _build(PLAN_2, seed=5)
    info = load_checkpoint(os.path.join(root, "inc"), fresh, fresh_optimizer)
    assert info["step"] == 6 and [Path(d).name for d in info["chain"]] == _entries(os.path.join(root, "inc")), info
    _assert_same(_snapshot(fresh, fresh_optimizer), live, "base + deltas against the live state")
    fresh, fresh_optimizer = _build(PLAN_2, seed=6)
    load_checkpoint(os.path.join(root, "async"), fresh, fresh_optimizer)
    _assert_same(_snapshot(fresh, fresh_optimizer), live, "async save against the live state")


def _other_world_rank(rank, world_size, root):
    """Another world size and plan: the chain and the full save load alike."""
    full, full_optimizer = _build(PLAN_1, seed=7)
    load_checkpoint(os.path.join(root, "sync"), full, full_optimizer)
    chained, chained_optimizer = _build(PLAN_1, seed=8)
    load_checkpoint(os.path.join(root, "inc"), chained, chained_optimizer)
    _assert_same(_snapshot(chained, chained_optimizer), _snapshot(full, full_optimizer), "base + deltas resharded")
    rebuilt, rebuilt_optimizer = _build(PLAN_1, seed=10)
    load_checkpoint(os.path.join(root, "q4_rebuilt"), rebuilt, rebuilt_optimizer)
    quantised, quantised_optimizer = _build(PLAN_1, seed=11)
    load_checkpoint(os.path.join(root, "q4"), quantised, quantised_optimizer)
    _assert_same(_snapshot(quantised, quantised_optimizer), _snapshot(rebuilt, rebuilt_optimizer), "4-bit deltas resharded")
    # A resumed run has no reference of its own yet: its first save is a base.
    # (synchronous saves: the deltas are coded in the step)
    resumed = _checkpointer(os.path.join(root, "q4"), quantised, quantised_optimizer, "ck-q4-resumed", policy="incremental",
                            base_every=3, keep_last=5, delta_bits=4, async_save=False)  # fmt: skip
    assert resumed.resume() == 6
    _train_step(quantised, quantised_optimizer, 6)
    resumed.save(7)
    resumed.save(8)
    resumed.finish()
    resumed.close()
    assert [r["kind"] for r in resumed.saves] == ["base", "delta"]


def test_async_equals_sync_and_deltas_equal_a_full_save(tmp_path):
    run_multi_process(_saves_rank, world_size=2, root=str(tmp_path))
    sync, background, incremental = tmp_path / "sync", tmp_path / "async", tmp_path / "inc"
    assert _entries(sync) == _entries(background) == ["step-000000002", "step-000000004", "step-000000006"]
    for name in _entries(sync):  # every file of every entry, bitwise
        assert _files(sync / name) == _files(background / name), name
    assert _entries(incremental) == ["step-000000004", "step-000000005", "step-000000006"]  # keep_last 2 + their base
    assert _files(incremental / "step-000000004") == _files(sync / "step-000000004")  # a base is a full save
    kinds = [json.loads((incremental / e / "manifest.json").read_text())["kind"] for e in _entries(incremental)]
    assert kinds == ["base", "delta", "delta"]
    run_multi_process(_other_world_rank, world_size=1, root=str(tmp_path))


# -- the policies, with planted dirty rows and counts -------------------------------------


def _tracker_of(dmp, table):
    for lookup in dmp.sharded["sparse_arch"]._lookups:
        names = [name.split("@")[0] for name in lookup.tables()]  # "t2@0": the shard of t2 at row 0
        if table in names:
            return lookup.tracker, names.index(table)
    raise KeyError(table)


def _delta_rows(entry: Path, table: str) -> torch.Tensor:
    """The global ids of the rows the delta ``entry`` saved of ``table`` (one block)."""
    (record,) = [f for f in json.loads((entry / "manifest.json").read_text())["files"] if f.get("table") == table]
    return decode_rows(torch.load(entry / record["file"]), record["row_offset"], record["num_rows"])


def _policies_rank(rank, world_size, root):
    # MFU: of the dirty rows, the most used, at most ceil(25% of 40) = 10.
    dmp, optimizer = _build(PLAN_1_TABLES, seed=1)
    mfu = _checkpointer(os.path.join(root, "mfu"), dmp, optimizer, "ck-mfu", policy="mfu", mfu_fraction=0.25)
    _train_step(dmp, optimizer, 0)
    mfu.save(1)  # the first save of a series is a base: every row, every bit clean
    tracker, t2 = _tracker_of(dmp, "t2")
    assert not any(bool(d.any()) for d in tracker.dirty)
    dirty = torch.zeros(40, dtype=torch.bool)
    dirty[torch.arange(0, 40, 2)] = True  # 20 even rows
    counts = torch.randperm(40, generator=torch.Generator().manual_seed(3)).to(torch.int32) * 7
    tracker.dirty[t2].copy_(dirty)
    tracker.counts[t2].copy_(counts)
    mfu.save(2)
    mfu.finish()
    due = dirty.nonzero().flatten()
    expected = due[counts[due].argsort(descending=True)[:10]].sort().values
    assert torch.equal(_delta_rows(Path(root, "mfu", "step-000000002"), "t2"), expected)
    assert _delta_rows(Path(root, "mfu", "step-000000002"), "t0").numel() == 0  # nothing changed there
    left = dirty.clone()
    left[expected] = False
    assert torch.equal(tracker.dirty[t2].cpu(), left)  # the rows not saved stay due
    mfu.close()

    # SSU: a sample of the dirty rows; what it leaves out stays due.
    dmp, optimizer = _build(PLAN_1_TABLES, seed=1)
    ssu = _checkpointer(os.path.join(root, "ssu"), dmp, optimizer, "ck-ssu", policy="ssu", ssu_fraction=0.5)
    _train_step(dmp, optimizer, 0)
    ssu.save(1)
    tracker, t2 = _tracker_of(dmp, "t2")
    dirty = torch.zeros(40, dtype=torch.bool)
    dirty[:30] = True
    tracker.dirty[t2].copy_(dirty)
    ssu.save(2)
    ssu.finish()
    saved = _delta_rows(Path(root, "ssu", "step-000000002"), "t2")
    assert 5 <= saved.numel() <= 25 and bool(dirty[saved].all()), saved
    left = dirty.clone()
    left[saved] = False
    assert torch.equal(tracker.dirty[t2].cpu(), left)
    ssu.close()

    # A corrupt delta and a missing base: refused naming the file, nothing loaded.
    dmp, optimizer = _build(PLAN_1_TABLES, seed=1)
    inc = _checkpointer(os.path.join(root, "inc"), dmp, optimizer, "ck-inc", policy="incremental", keep_last=5)
    for step in range(3):
        _train_step(dmp, optimizer, step)
        inc.save(step + 1)
    inc.finish()
    inc.close()
    fresh, fresh_optimizer = _build(PLAN_1_TABLES, seed=4)
    before = _snapshot(fresh, fresh_optimizer)
    corrupt = Path(root, "corrupt")
    shutil.copytree(Path(root, "inc"), corrupt)
    (victim,) = (corrupt / "step-000000003" / "deltas" / "sparse_arch" / "t0").glob("*.pt")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="r0_c0.pt"):
        load_checkpoint(corrupt, fresh, fresh_optimizer)
    _assert_same(_snapshot(fresh, fresh_optimizer), before, "after a refused corrupt delta")
    # A bitmap that names more rows than the delta holds: refused naming the file, nothing loaded.
    miscounted = Path(root, "miscounted")
    shutil.copytree(Path(root, "inc"), miscounted)
    entry = miscounted / "step-000000003"
    manifest = json.loads((entry / "manifest.json").read_text())
    (record,) = [f for f in manifest["files"] if f["kind"] == "delta" and f["table"] == "t0"]
    tensors = torch.load(entry / record["file"])
    assert "row_bits" in tensors  # (most of t0's rows changed: a bitmap)
    bits = tensors["row_bits"]
    bits[0] = 255 if int(bits[0]) != 255 else 0
    torch.save(tensors, entry / record["file"])
    data = (entry / record["file"]).read_bytes()
    record["bytes"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"r0_c0.pt: its row bitmap names \d+ rows; the manifest records"):
        load_checkpoint(miscounted, fresh, fresh_optimizer)
    _assert_same(_snapshot(fresh, fresh_optimizer), before, "after a refused miscounted delta")
    orphan = Path(root, "orphan")
    shutil.copytree(Path(root, "inc"), orphan)
    shutil.rmtree(orphan / "step-000000001")
    with pytest.raises(CheckpointError, match="step-000000001 is missing"):
        load_checkpoint(orphan, fresh, fresh_optimizer)
    with pytest.raises(CheckpointError, match="step-000000001 is missing"):
        load_checkpoint(orphan / "step-000000003", fresh, fresh_optimizer)
    _assert_same(_snapshot(fresh, fresh_optimizer), before, "after a refused chain without its base")


def test_policies_save_what_they_say_and_broken_chains_are_refused(tmp_path):
    run_multi_process(_policies_rank, world_size=1, root=str(tmp_path))


# -- the interval ----------------------------------------------------------------------


def test_young_daly_interval():
    assert young_daly(2.0, 3600.0) == pytest.approx(math.sqrt(2 * 2.0 * 3600.0))  # 120 s
    # At Young's interval the save and lost-work shares are equal.
    t = young_daly(2.0, 3600.0)
    assert 2.0 / t == pytest.approx(t / 2 / 3600.0)
    assert full_recovery_overhead(t, 2.0, 3600.0) < min(full_recovery_overhead(t / 2, 2.0, 3600.0),
                                                        full_recovery_overhead(t * 2, 2.0, 3600.0))  # fmt: skip
    with pytest.raises(ValueError, match="mtbf_s=0"):
        young_daly(1.0, 0.0)


def test_partial_recovery_interval_meets_the_target_pls():
    t = partial_recovery_interval(0.01, 600.0, 4)
    assert t == pytest.approx(2 * 0.01 * 600.0 * 4)  # 48 s
    assert expected_pls(t, 600.0, 4) == pytest.approx(0.01)
    assert expected_pls(t * 1.01, 600.0, 4) > 0.01  # the largest such interval
    with pytest.raises(ValueError):
        partial_recovery_interval(1.5, 600.0, 4)


def test_choose_interval_picks_the_rule_and_rounds_to_steps():
    full = choose_interval(save_cost_s=0.5, mtbf_s=900.0, step_s=0.1, partial=False)
    assert full.rule == "young-daly" and full.steps == int(math.sqrt(2 * 0.5 * 900.0) / 0.1)
    assert "young-daly" in full.describe() and "MTBF 900 s" in full.describe()
    partial = choose_interval(save_cost_s=0.5, mtbf_s=900.0, step_s=0.1, partial=True, target_pls=0.02, num_shards=2)
    assert partial.rule == "partial-recovery" and partial.steps == int(2 * 0.02 * 900.0 * 2 / 0.1)
    assert partial.figures["expected_pls"] == pytest.approx(0.02)
    assert "target PLS 0.02" in partial.describe()
    assert choose_interval(1e-6, 1.0, 10.0, False).steps == 1  # never below one step


def test_the_interval_is_never_shorter_than_a_background_write():
    choice = choose_interval(save_cost_s=0.01, mtbf_s=100.0, step_s=0.1, partial=False, write_s=5.0)
    assert choice.seconds == 5.0 and choice.steps == 50 and "raised to one background write" in choice.rule
