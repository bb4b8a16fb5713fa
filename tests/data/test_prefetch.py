"""The background prefetcher: order kept, errors raised where they happened,
closing stops the worker."""

import threading
import time

import pytest

from dist_rec.data.prefetch import Prefetcher


def test_items_arrive_in_order_and_the_end_is_the_end():
    prefetcher = Prefetcher(iter(range(100)), depth=3)
    assert list(prefetcher) == list(range(100))
    assert next(prefetcher, None) is None


def test_an_error_is_raised_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise ValueError("train.csv:17: label ('click') must be 0 or 1, got '2'")

    prefetcher = Prefetcher(source(), depth=1)
    assert next(prefetcher) == 1 and next(prefetcher) == 2
    with pytest.raises(ValueError, match=r"train.csv:17: label"):
        next(prefetcher)
    assert next(prefetcher, None) is None


def test_the_worker_runs_ahead_by_at_most_depth():
    produced = []

    def source():
        for i in range(50):
            produced.append(i)
            yield i

    prefetcher = Prefetcher(source(), depth=2)
    time.sleep(0.3)
    assert len(produced) <= 3  # two in the queue, one in the worker's hand
    assert next(prefetcher) == 0
    prefetcher.close()


def test_close_stops_a_worker_blocked_on_a_full_queue():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    prefetcher = Prefetcher(endless(), depth=1)
    next(prefetcher)
    prefetcher.close()
    assert threading.active_count() == before
    assert next(prefetcher, None) is None


def test_depth_is_checked():
    with pytest.raises(ValueError, match="Invalid depth=0"):
        Prefetcher(iter([]), depth=0)


# -- the worker process --------------------------------------------------------------------

import gc  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

from dist_rec.data.prefetch import BatchWorker  # noqa: E402
from dist_rec.data.schema import Schema  # noqa: E402
from dist_rec.data.synthetic import SyntheticConfig, SyntheticDataset  # noqa: E402
from dist_rec.data.tabular import TextDataset  # noqa: E402
from dist_rec.testing import tables  # noqa: E402


def _same(a, b):
    assert torch.equal(a.labels, b.labels) and torch.equal(a.dense_features, b.dense_features)
    ka, kb = a.sparse_features, b.sparse_features
    assert ka.keys() == kb.keys() and ka.stride() == kb.stride()
    assert torch.equal(ka.values(), kb.values()) and torch.equal(ka.lengths(), kb.lengths())
    assert (ka.weights_or_none() is None) == (kb.weights_or_none() is None)
    if ka.weights_or_none() is not None:
        assert torch.equal(ka.weights(), kb.weights())


@pytest.mark.parametrize("slot_bytes", [16 << 20, 4096])  # in shared memory; too large for a slot: through the pipe
def test_the_worker_process_hands_over_the_same_batches(tmp_path, slot_bytes):
    path = tables.write_lines(tmp_path / "seq.tsv", tables.sequence_lines(500))
    dataset = TextDataset([path], Schema.from_dict(tables.SEQUENCE_SCHEMA))  # weighted, multi-hot, shared table
    states = []
    worker = BatchWorker(dataset, depth=2, slot_bytes=slot_bytes, on_state=states.append)
    try:
        got = list(worker.start(2, 64, 1, 2))  # rank 1 of 2, two epochs
        expected = list(dataset.batches(64, 1, 2)) * 2
        assert len(got) == len(expected) == 6
        for a, b in zip(got, expected):
            _same(a, b)
        assert states[-1]["exhausted"] and states[-1]["skips"].lines_read == 500 and states[-1]["epoch"] == 1
        # A new stream from a step: the same worker, the batches from there on.
        resumed = list(worker.start(2, 64, 1, 2, start_step=2))
        assert len(resumed) == 4
        _same(resumed[0], expected[2])
    finally:
        worker.close()


def test_a_new_stream_abandons_the_one_in_flight():
    dataset = SyntheticDataset(SyntheticConfig(num_embeddings_per_feature=[10, 20]), "train")
    worker = BatchWorker(dataset, depth=2)
    try:
        first = worker.start(1, 16, 0, 1)
        next(first)
        second = worker.start(1, 16, 0, 1, start_step=100)
        _same(next(second), next(dataset.batches(16, 0, 1, start_step=100)))
    finally:
        worker.close()


def test_an_error_in_the_worker_process_is_raised_with_its_type_and_message(tmp_path):
    lines = tables.avazu_lines(300)
    lines[250] = lines[250].replace(",", ";", 2)
    path = tables.write_lines(tmp_path / "a.csv", lines)
    dataset = TextDataset([path], Schema.from_dict(tables.AVAZU_SCHEMA), chunk_rows=100)
    worker = BatchWorker(dataset, depth=1)
    try:
        batches = worker.start(1, 50, 0, 1)
        assert len([next(batches) for _ in range(4)]) == 4  # the batches before the bad line's chunk
        with pytest.raises(ValueError, match=rf"{path}:251: expected 12 ','-separated fields, got 10"):
            list(batches)
    finally:
        worker.close()


def test_a_worker_that_dies_is_reported_not_waited_for():
    import signal

    worker = BatchWorker(SyntheticDataset(SyntheticConfig(num_embeddings_per_feature=[10, 20]), "train"), depth=1)
    batches = worker.start(1, 8, 0, 1)
    next(batches)
    os.kill(worker._process.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"data worker process \(pid \d+\) died \(exit code -9\)"):
        for _ in range(100):
            next(batches)


def test_a_worker_that_crashes_is_reported_with_its_stack():
    import signal

    worker = BatchWorker(SyntheticDataset(SyntheticConfig(num_embeddings_per_feature=[10, 20]), "train"), depth=1)
    batches = worker.start(1, 8, 0, 1)
    next(batches)
    os.kill(worker._process.pid, signal.SIGSEGV)
    with pytest.raises(RuntimeError, match=r"(?s)died \(exit code -11; its fault handler wrote:\n"
                                           r"Fatal Python error: Segmentation fault.*_serve.*\) before handing"):  # fmt: skip
        for _ in range(100):
            next(batches)


class _CollectingDataset(SyntheticDataset):
    """Runs the collector in the worker before its first batch."""

    def batches(self, *args, **kwargs):
        gc.collect()
        return super().batches(*args, **kwargs)


def test_the_trainers_garbage_is_not_finalised_in_the_worker():
    # A process group of an earlier run, left in a reference cycle: finalised
    # in the forked worker (whose copy has none of its threads), it hangs it.
    import torch.distributed as dist

    enabled = gc.isenabled()
    gc.disable()
    try:
        group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)
        group.allreduce(torch.ones(2)).wait()
        cycle = {"group": group}
        cycle["self"] = cycle
        del group, cycle
        worker = BatchWorker(_CollectingDataset(SyntheticConfig(num_embeddings_per_feature=[10, 20]), "train"), depth=1)
    finally:
        if enabled:
            gc.enable()
    try:
        batches = worker.start(1, 8, 0, 1)
        assert worker._messages.poll(60), "the worker hangs in its collector"
        assert next(batches).labels.shape == (8,)
    finally:
        worker.close()
        gc.collect()  # here, where the group's threads are


def test_close_stops_the_worker_and_frees_its_shared_memory():
    worker = BatchWorker(SyntheticDataset(SyntheticConfig(num_embeddings_per_feature=[10, 20]), "train"), depth=2)
    names = [m.name for m in worker._slots]
    batches = worker.start(1, 8, 0, 1)
    next(batches)
    process = worker._process
    worker.close()
    assert not process.is_alive()
    assert not any(os.path.exists(f"/dev/shm/{name.lstrip('/')}") for name in names)
    with pytest.raises(RuntimeError, match="data worker process was closed"):  # not taken for the end of the data
        next(batches)


def test_a_read_error_in_the_worker_names_the_file(tmp_path):
    import gzip

    path = tmp_path / "a.csv.gz"
    path.write_bytes(gzip.compress("\n".join(tables.avazu_lines(3000)).encode())[:-2000])  # truncated
    schema = Schema.from_dict({"label": "click", "sparse": [{"name": "site_id", "num_embeddings": 100}]})  # no fitting pass
    dataset = TextDataset([path], schema, chunk_rows=500)
    worker = BatchWorker(dataset, depth=1)
    try:
        with pytest.raises(ValueError, match=rf"{path}: cannot be read past what was read so far: EOFError"):
            list(worker.start(1, 100, 0, 1))
        assert worker._process.is_alive()  # the worker serves the next stream
    finally:
        worker.close()
