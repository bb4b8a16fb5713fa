"""Batches prepared ahead of the training step by a background thread.

Parsing or generating a batch costs the training thread a few ms per
thousand samples; a worker thread does it while the step runs, handing
batches over through a bounded queue (``depth`` batches ahead, so memory
stays bounded). A thread rather than a process: the readers spend their
time in numpy and torch calls that release the GIL, batches need no
pickling, and an error keeps its type and traceback. An error in the
worker is raised in the training thread at the batch where it happened,
the same exception (its message names the file and line), after the
batches before it.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional, TypeVar

T = TypeVar("T")

_DONE = object()


class Prefetcher(Iterator[T]):
    """Iterates ``source`` in a daemon thread, ``depth`` items ahead.

    ``close()`` (or the end of the source) stops the thread; a consumer
    that stops early must call it, or the thread stays blocked on a full
    queue until the process ends.
    """

    def __init__(self, source: Iterator[T], depth: int = 2, name: str = "dist_rec-prefetch") -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"Invalid depth={depth!r}. Must be an int >= 1.")
        self._source = source
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._finished = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as error:  # noqa: BLE001 -- handed to the consumer, raised there
            self._error = error
        self._put(_DONE)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._finished = True
            self._thread.join()
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stops the worker (it finishes the item in hand) and drops what it prepared."""
        self._stop.set()
        self._finished = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
        close = getattr(self._source, "close", None)
        if close is not None and not self._thread.is_alive():
            close()
