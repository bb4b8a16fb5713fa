"""The background writer: a cancelled write stops within a chunk, publishes
nothing and leaves the entries already published as they were."""

import threading
import time

import pytest
import torch

from dist_rec.checkpoint import files
from dist_rec.checkpoint.files import CheckpointError, WriteCancelled, write_tensors
from dist_rec.checkpoint.series import CheckpointSeries
from dist_rec.checkpoint.snapshot import Item, Snapshot
from dist_rec.checkpoint.writer import BackgroundWriter, write_entry
from dist_rec.distributed.world import destroy_process_group, init_single_process_group


class _SetAfter(threading.Event):
    """An event that reads as set from its ``n``-th check on: a cancel
    arriving while a file is half written."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.checks, self.n = 0, n

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.n or super().is_set()


def test_a_cancelled_file_write_stops_at_the_next_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_CHUNK", 1 << 20)
    tensor = torch.arange(4 << 20, dtype=torch.float32)  # 16 MiB: one write of 16 chunks
    size, _ = write_tensors(tmp_path / "whole.pt", {"weight": tensor})
    assert size > tensor.numel() * 4
    cancel = _SetAfter(5)
    with pytest.raises(WriteCancelled, match="half.pt"):
        write_tensors(tmp_path / "half.pt", {"weight": tensor}, cancel)
    assert (tmp_path / "half.pt").stat().st_size < 5 << 20  # stopped after 4 of its 16 chunks
    already = threading.Event()
    already.set()
    with pytest.raises(WriteCancelled):
        write_tensors(tmp_path / "none.pt", {"weight": tensor}, already)


def _snapshot(step: int, rows: int) -> Snapshot:
    weight = torch.full((rows, 16), float(step))
    items = [Item(f"shards/t{i}/r0_c0.pt", "shard", {"weight": weight}, "sparse_arch", f"t{i}", (0, rows, 0, 16), 0)
             for i in range(4)]  # fmt: skip
    items.append(Item("dense.pt", "dense", {"model": {"w": torch.ones(3)}, "optimizer": None, "extra": {}}))
    return Snapshot(step, "base", items, rows_saved=4 * rows, rows_total=4 * rows)


def test_a_cancelled_background_write_publishes_nothing_and_keeps_the_last_entry(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(files, "_CHUNK", 1 << 20)
    init_single_process_group()
    try:
        group = dist.new_group([0])
        root = tmp_path / "ckpt"
        header = {"format": "test"}
        write_entry(root, _snapshot(1, 1000), header, group)
        first = CheckpointSeries(root).entries()
        writer = BackgroundWriter()
        started = threading.Event()

        def slow_hook(stage, path):  # each file takes a while: the cancel lands mid-entry
            started.set()
            time.sleep(0.2)

        from dist_rec.checkpoint import checkpoint as checkpoint_module

        monkeypatch.setattr(checkpoint_module, "_fault_hook", slow_hook)
        writer.start(lambda: write_entry(root, _snapshot(2, 1 << 18), header, group, cancel=writer.cancel))
        assert started.wait(30)
        writer.cancel.set()
        began = time.perf_counter()
        with pytest.raises(CheckpointError, match="cancelled"):  # told to every rank of the write
            writer.wait()
        assert time.perf_counter() - began < 5
        assert CheckpointSeries(root).entries() == first  # nothing published; the last entry as it was
        assert [p.name for p in first] == ["step-000000001"]
        assert not writer.cancel.is_set()  # the cancel was for that write only
        writer.cancel.set()  # a cancel with nothing in flight (a failure between saves) does not outlive it either
        assert writer.wait() is None and not writer.cancel.is_set()
        # The writer is reusable: the next write is not cancelled.
        writer.start(lambda: write_entry(root, _snapshot(3, 100), header, group, cancel=writer.cancel))
        writer.wait()
        assert [p.name for p in CheckpointSeries(root).entries()] == ["step-000000001", "step-000000003"]
        writer.close()
    finally:
        destroy_process_group()


def _writer_threads():
    return [t for t in threading.enumerate() if t.name == "dist_rec-checkpoint-writer"]


def test_one_thread_serves_every_write_and_close_ends_it():
    before = len(_writer_threads())
    writer = BackgroundWriter()
    for value in range(3):
        writer.start(lambda value=value: value * 10)
        assert writer.wait() == value * 10
    assert len(_writer_threads()) == before + 1  # one thread for the three writes
    writer.start(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.wait()
    writer.close()
    assert len(_writer_threads()) == before
    writer.start(lambda: "again")  # a closed writer makes a new thread
    assert writer.wait() == "again"
    writer.close()
    assert len(_writer_threads()) == before


def test_close_does_not_wait_for_a_write_in_flight():
    """After a failure the write in flight may hang in a collective until the
    group's timeout; closing must not hang with it."""
    before = len(_writer_threads())
    release = threading.Event()
    writer = BackgroundWriter()
    writer.start(lambda: release.wait(60))
    assert writer.busy
    began = time.perf_counter()
    writer.close()
    assert time.perf_counter() - began < 1
    assert writer.wait() is None and not writer.busy  # nothing in flight any more, as far as this writer knows
    release.set()  # the abandoned write ends; its thread with it
    deadline = time.perf_counter() + 10
    while len(_writer_threads()) > before and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert len(_writer_threads()) == before
