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
