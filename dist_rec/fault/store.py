"""The fault-tolerant job's store: its keys and how they are read.

The launcher of the job's first node hosts a ``TCPStore`` that outlives
every worker (``launch.py``); workers, launchers and the coordinator talk
through it. Keys (JSON values; ``<r>`` an original rank):

==========================  ====================================================
``ft/hb/<r>``               heartbeat of rank r's process: incarnation, count, epoch, step, state, pid
``ft/join/<r>``             rank r's process is ready for the next epoch: incarnation, "fresh" | "intact", step
``ft/exit/<r>``             rank r's process exited (written by its launcher): incarnation, code
``ft/fence/<r>``            the incarnation of rank r the launcher must kill (declared dead)
``ft/epoch/<e>``            epoch e (``membership.Epoch``); ``ft/epoch/latest`` its number
``ft/abort/<e>``            epoch e was aborted (a failure): its members leave their collectives
``ft/pending``              an epoch the running members switch to at their next step boundary
``ft/report/<r>``           rank r saw a collective fail: its epoch, step, error
``ft/failed``               the job gave up (the reason); every launcher stops
==========================  ====================================================

Every key a reader polls is created at start (``initialise``), so reads
never block on a missing key (``TCPStore.get`` would wait for it).
"""

from __future__ import annotations

import datetime
import json
from typing import Dict, List, Optional

import torch.distributed as dist

EMPTY = b""


def connect(address: str, timeout_s: float = 30.0, is_master: bool = False, world_size: Optional[int] = None) -> dist.TCPStore:
    """A client (or, with ``is_master``, the server) of the store at ``host:port``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Invalid store address {address!r}. Must be host:port.")
    return dist.TCPStore(
        host,
        int(port),
        world_size,
        is_master=is_master,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


class ReconnectingStore:
    """A store client that connects again after a failed call.

    A host cut off from the store's host sees its calls time out; the
    connection may not survive that. Each call goes to the current client;
    a call that raises drops it, and the next call connects afresh (and
    raises if the store is still unreachable). ``client`` is the current
    ``TCPStore`` (for torch's process groups)."""

    _CALLS = ("get", "set", "check", "add", "multi_get", "compare_set", "wait", "delete_key", "num_keys")

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.address, self.timeout_s = address, float(timeout_s)
        self._client: Optional[dist.TCPStore] = connect(address, timeout_s)

    @property
    def client(self) -> dist.TCPStore:
        if self._client is None:
            self._client = connect(self.address, self.timeout_s)
        return self._client

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def __getattr__(self, name: str):
        if name not in self._CALLS:
            raise AttributeError(name)

        def call(*args, **kwargs):
            try:
                return getattr(self.client, name)(*args, **kwargs)
            except Exception:
                self._client = None
                raise

        return call


def key(kind: str, rank) -> str:
    return f"ft/{kind}/{rank}"


def initialise(store: dist.TCPStore, world_size: int) -> None:
    """Creates every polled key empty (the launcher of node 0, once)."""
    for rank in range(world_size):
        for kind in ("hb", "join", "exit", "fence", "report"):
            store.set(key(kind, rank), EMPTY)
    store.set("ft/pending", EMPTY)
    store.set("ft/failed", EMPTY)
    store.set("ft/epoch/latest", b"-1")


def set_json(store: dist.TCPStore, name: str, value) -> None:
    store.set(name, json.dumps(value).encode())


def get_json(store: dist.TCPStore, name: str):
    """The JSON value of an existing key (None when it is empty)."""
    raw = store.get(name)
    return json.loads(raw) if raw else None


def get_if_set(store: dist.TCPStore, name: str):
    """The JSON value of ``name``, or None when it does not exist or is empty."""
    if not store.check([name]):
        return None
    return get_json(store, name)


def get_all(store: dist.TCPStore, kind: str, world_size: int) -> List[Optional[Dict]]:
    """``ft/<kind>/<r>`` of every rank in one round trip."""
    values = store.multi_get([key(kind, r) for r in range(world_size)])
    return [json.loads(v) if v else None for v in values]
